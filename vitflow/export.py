"""Reduced-precision copies of a fine-tuned model, each checked against the FP32 original.

In: a model directory `load_model` reads (usually one `ImageClassifier.save` wrote) and the preprocessed test split.
Out: one directory per precision, each with a `vitflow.json` sidecar whose "precision" says what it holds:
- fp32 / fp16 / bf16: safetensors weights in that dtype plus configs; `load_model` reads them back (upcast to
  float32) and, for transformers models, so does `from_pretrained` (in the saved dtype).
- int8: `model.onnx`, the model with every Linear layer dynamically quantised by ONNX Runtime (int8 weights,
  activations quantised per batch at run time).
`load_exported` runs any of them; `compare_precisions` returns the record of how far one strays from FP32.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from vitflow.data.cache import load_split
from vitflow.errors import VitflowError
from vitflow.inference import predict_logits
from vitflow.models import DataConfig, ImageClassifier, load_model
from vitflow.models.base import write_sidecar
from vitflow.precision import (
    DTYPES,
    ONNX_FILE,
    ONNX_INPUT,
    Runner,
    check_precision,
    load_exported,
)

WEIGHT_SUFFIXES = (".safetensors", ".onnx")



def export_model(model_dir: Path | str, precision: str, out_dir: Path | str) -> Path:
    """Write a `precision` copy of the model in `model_dir` into `out_dir`; returns `out_dir`."""
    check_precision(precision)
    out_dir = Path(out_dir)
    classifier = load_model(str(model_dir)).eval()
    if precision == "int8":
        out_dir.mkdir(parents=True, exist_ok=True)
        _export_int8_onnx(classifier, out_dir / ONNX_FILE)
    else:
        classifier.to(DTYPES[precision]).save(out_dir)
    write_sidecar(out_dir, classifier, precision=precision)
    return out_dir


def compare_precisions(fp32_model_dir: Path | str, exported_dir: Path | str, precision: str,
                       images_uint8: torch.Tensor, labels: torch.Tensor, batch_size: int,
                       reference_logits: torch.Tensor | None = None, device: str = "auto") -> dict:
    """The record of an export against its FP32 original on uint8 images [N, 3, S, S] with true `labels`,
    both run on `device` (a `train.device` setting).

    `reference_logits`: the FP32 model's logits on these images, when already computed (else they are).
    """
    check_precision(precision)
    exported = load_exported(exported_dir, device)
    if exported.precision != precision:
        raise VitflowError(f"{exported_dir}: holds a {exported.precision} export, not {precision}")
    if reference_logits is None:
        reference_logits = predict_logits(load_exported(fp32_model_dir, device), images_uint8, batch_size)
    logits = predict_logits(exported, images_uint8, batch_size)
    size, fp32_size = weights_bytes(exported_dir), weights_bytes(fp32_model_dir)
    return {
        "precision": precision,
        "compute": exported.compute,
        "path": str(exported_dir),
        "size_bytes": size,
        "size_ratio_vs_fp32": size / fp32_size,
        "top1_agreement": (logits.argmax(1) == reference_logits.argmax(1)).float().mean().item(),
        "max_abs_logit_diff": (logits - reference_logits).abs().max().item(),
        "accuracy": (logits.argmax(1) == labels).float().mean().item(),
        "fp32_accuracy": (reference_logits.argmax(1) == labels).float().mean().item(),
    }


def export_and_verify(model_dir: Path | str, cache_dir: Path | str, out_root: Path | str,
                      precisions: Sequence[str] = ("fp16", "bf16", "int8"), batch_size: int = 32,
                      device: str = "auto") -> list[dict]:
    """Export `model_dir` at each precision into `out_root/<precision>`; one record each, on the test split,
    checked on `device` (a `train.device` setting)."""
    for precision in precisions:
        check_precision(precision)
    test = load_split(cache_dir, "test")
    reference_logits = predict_logits(load_exported(model_dir, device), test.images, batch_size)
    return [compare_precisions(model_dir, export_model(model_dir, precision, Path(out_root) / precision), precision,
                               test.images, test.labels, batch_size, reference_logits, device)
            for precision in precisions]


def weights_bytes(model_dir: Path | str) -> int:
    """Size on disk of the weight files (*.safetensors, *.onnx) in `model_dir`."""
    return sum(path.stat().st_size for path in Path(model_dir).iterdir() if path.name.endswith(WEIGHT_SUFFIXES))


@torch.inference_mode()
def benchmark_latency(model: Runner, image_size: DataConfig | int,
                      batch_size: int = 1, repeats: int = 5) -> dict:
    """Mean time of `repeats` calls on random pixels [batch_size, 3, S, S] after one warm-up call.

    `model`: an `ExportedModel` or any callable on normalised pixels. Out: ms_per_image, images_per_second.
    """
    side = image_size.image_size if isinstance(image_size, DataConfig) else image_size
    pixels = torch.randn(batch_size, 3, side, side, generator=torch.Generator().manual_seed(0))
    model(pixels)
    start = time.perf_counter()
    for _ in range(repeats):
        model(pixels)
    seconds_per_image = (time.perf_counter() - start) / (repeats * batch_size)
    return {"ms_per_image": seconds_per_image * 1000, "images_per_second": 1 / seconds_per_image}


def _export_int8_onnx(classifier: ImageClassifier, path: Path) -> None:
    """Trace `classifier` to ONNX (batch size left free), then quantise its MatMul/Gemm (Linear) weights to int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    side = classifier.data_config.image_size
    with tempfile.TemporaryDirectory() as scratch:
        fp32_path = Path(scratch) / "fp32.onnx"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
            # The TorchScript exporter: the torch.export-based one needs `onnxscript`, which vitflow does not ship.
            torch.onnx.export(classifier, (torch.zeros(1, 3, side, side),), str(fp32_path), dynamo=False,
                              input_names=[ONNX_INPUT], output_names=["logits"], opset_version=17,
                              dynamic_axes={ONNX_INPUT: {0: "batch"}, "logits": {0: "batch"}})
        root_logger = logging.getLogger()
        root_logger.addFilter(_drop_preprocessing_hint)
        try:
            quantize_dynamic(fp32_path, path, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                             per_channel=True)
        finally:
            root_logger.removeFilter(_drop_preprocessing_hint)


def _drop_preprocessing_hint(record: logging.LogRecord) -> bool:
    """ONNX Runtime's quantiser advises shape-inference pre-processing; on ViTs it brought no speed-up."""
    return not record.getMessage().startswith("Please consider to run pre-processing")

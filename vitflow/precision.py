"""Run a saved model at the precision it was exported in: fp32, fp16, bf16 or int8.

`load_exported(dir)` gives a callable from normalised pixels [N, 3, S, S] (float32) to float32
logits, whatever the directory holds: a plain checkpoint (fp32), an fp16/bf16 safetensors copy,
or an int8 ONNX file (run by ONNX Runtime). Used by the export checks, `vitflow predict
--precision` and the MLflow serving model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vitflow.devices import resolve_device
from vitflow.errors import VitflowError
from vitflow.models import DataConfig, ImageClassifier, load_model
from vitflow.models.base import read_sidecar

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_FILE = "model.onnx"
ONNX_INPUT = "pixel_values"
Runner = Callable[[torch.Tensor], torch.Tensor]  # normalised pixels float32 -> float32 logits on the CPU


@dataclass
class ExportedModel:
    """An exported model ready to run: normalised pixels float32 [N, 3, S, S] -> float32 logits on the CPU."""

    run: Runner
    precision: str  # what is stored: one of PRECISIONS
    compute: str  # how it runs, e.g. "cpu-fp32-upcast", "cuda-fp16", "cpu-bf16", "mps-fp32", "cpu-int8-onnxruntime"
    labels: list[str]
    data_config: DataConfig

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.run(pixels)


def load_exported(model_dir: Path | str, device: str = "auto") -> ExportedModel:
    """Any model directory (an export, or a plain checkpoint taken as fp32), ready to run on `device`
    (a `train.device` setting: auto picks a GPU when there is one).

    fp16 runs in FP16 on a GPU, else upcast to FP32 (FP16 arithmetic is slow or missing on CPUs); bf16 runs
    in BF16 (natively on CPUs with BF16 instructions); int8 runs in ONNX Runtime on the CPU.
    """
    model_dir = Path(model_dir)
    sidecar = read_sidecar(model_dir)
    precision = sidecar.get("precision", "fp32")
    check_precision(precision)
    if precision == "int8":
        return ExportedModel(_onnx_runner(model_dir / ONNX_FILE), precision, "cpu-int8-onnxruntime",
                             sidecar["labels"], DataConfig.from_dict(sidecar["data_config"]))
    device = resolve_device(device).type
    dtype = DTYPES[precision]
    compute = f"{device}-{precision}"
    if precision == "fp16" and device != "cuda":
        dtype, compute = torch.float32, "cpu-fp32-upcast"
    classifier = load_model(str(model_dir))
    return ExportedModel(_torch_runner(classifier, dtype, device), precision, compute, classifier.labels,
                         classifier.data_config)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise VitflowError(f"export precision {precision!r} is not supported; choose from {', '.join(PRECISIONS)}")


def _onnx_runner(path: Path) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # one thread budget for torch and ONNX Runtime alike
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {ONNX_INPUT: pixels.float().contiguous().cpu().numpy()})[0])

    return run


def _torch_runner(classifier: ImageClassifier, dtype: torch.dtype, device: str) -> Runner:
    model = classifier.to(device=device, dtype=dtype).eval()

    @torch.inference_mode()
    def run(pixels: torch.Tensor) -> torch.Tensor:
        return model(pixels.to(device=device, dtype=dtype)).float().cpu()

    return run

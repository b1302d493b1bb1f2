"""Which device and numeric precision to compute on: `train.device` and `train.precision`.

auto device: a CUDA GPU, else Apple's MPS, else the CPU. auto precision: bf16 where the hardware runs it
fast (CUDA GPUs with bf16; CPUs with AMX or AVX512-BF16), else fp16 with loss scaling on older CUDA GPUs,
else fp32. Training, evaluation, rollout, the export checks and `predict` all run on the chosen device.

`train.attention`, the attention kernel training uses: auto is the model's own (PyTorch's fused
`scaled_dot_product_attention`, sdpa, where its library supports it) except in bf16 on a CPU, where the fused
backward pass is slower than the plain matmul + softmax (eager).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vitflow.errors import VitflowError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ATTENTION_KERNELS = ("auto", "sdpa", "eager")
FAST_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def resolve_device(setting: str = "auto") -> torch.device:
    """The torch device `setting` names; one line naming `train.device` when it is not available here."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if setting not in available:
        raise VitflowError(f"train.device={setting!r}: unknown device; use one of {', '.join(DEVICES)}")
    if not available[setting]:
        raise VitflowError(f"train.device={setting}: no {setting.upper()} device on this machine; "
                           "set train.device: auto or cpu")
    return torch.device(setting)


def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AMX or AVX512-BF16)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:  # not Linux: no cheap way to ask, so stay with fp32
        return False
    return bool(FAST_BF16_CPU_FLAGS & set(flags))


def resolve_precision(setting: str, device: torch.device, fast_bf16_cpu: bool | None = None) -> str:
    """fp32, bf16 or fp16 for `setting` on `device`; one line naming `train.precision` for an unusable one."""
    if setting not in PRECISIONS:
        raise VitflowError(f"train.precision={setting!r}: unknown precision; use one of {', '.join(PRECISIONS)}")
    if setting == "fp16" and device.type != "cuda":
        raise VitflowError(f"train.precision=fp16 needs a CUDA GPU (this run trains on {device.type}); "
                           "use bf16 or fp32")
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and (cpu_has_fast_bf16() if fast_bf16_cpu is None else fast_bf16_cpu):
        return "bf16"
    return "fp32"


def resolve_attention(setting: str, device: torch.device, precision: str) -> str | None:
    """sdpa or eager for `setting` when training on `device` in `precision`; None: the model's own kernel.

    auto: eager for bf16 on a CPU, else the model's own. There PyTorch's fused attention backward took 0.33 s of a
    0.75 s step (ViT-S/14, 168 px, batch 16, torch 2.15 on a 2-core Xeon with AMX), eager's matmuls 0.13 s: the
    step falls to 0.55 s. In fp32 and on GPUs the fused kernel is the faster one.
    """
    if setting not in ATTENTION_KERNELS:
        raise VitflowError(f"train.attention={setting!r}: unknown kernel; use one of {', '.join(ATTENTION_KERNELS)}")
    if setting != "auto":
        return setting
    return "eager" if device.type == "cpu" and precision == "bf16" else None

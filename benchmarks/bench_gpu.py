"""Benchmark `full` training on a CUDA GPU, and print a table for the README.

    uv run python -m benchmarks.bench_gpu [--images 16384] [--configs 16:1,128:8,256:12] [--peak-flops F] [--flow]

Needs a CUDA device; elsewhere it stops in one line. params.yaml's settings with train.device=cuda,
train.precision=auto and every patch (train.full.patch_dropout=0: the FLOPs counted are the FLOPs run): first the
shipped ants vs bees at 224 px (the flow's cache, built when missing), then one epoch on a synthetic set (random
32x32 RGB in 10 classes, preprocessed to 224 px) for each batch size : loader workers pair. Per row: training
images/s over the whole fit (validation included) and in steady state (optimizer steps after the first 20, within
epochs), peak GPU memory, and model FLOP utilisation: 3 x the forward FLOPs per image (FlopCounterMode, one forward
pass) x steady images/s / the GPU's peak dense bf16 FLOP/s. `--flow` adds the wall time of `vitflow run --set
train.device=cuda` in a scratch work directory and MLflow store.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.machine import machine
from benchmarks.runs import shipped_cache, train_full
from vitflow.training.engine import TrainingObserver

# dense bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name(); the first match wins
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
             "L40S": 362e12, "L4": 121e12}
WARMUP_STEPS = 20
CUDA = ["train.device=cuda", "train.precision=auto", "train.full.patch_dropout=0"]


class StepClock(TrainingObserver):
    """Optimizer steps per second within epochs, after the first WARMUP_STEPS (the step observer runs after
    `loss.item()`, so each step's work is done when it is told)."""

    def __init__(self):
        self.last: float | None = None
        self.steps, self.seconds = 0, 0.0

    def step(self, step: int, values: dict[str, float]) -> None:
        now = time.perf_counter()
        if self.last is not None and step > WARMUP_STEPS:
            self.steps, self.seconds = self.steps + 1, self.seconds + now - self.last
        self.last = now

    def epoch(self, row: dict) -> None:
        self.last = None  # the next interval holds validation and the loader's restart


def forward_flops(source: str | None, image_size: int) -> float:
    """FLOPs of one forward pass of the model per image, counted by torch on the GPU."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitflow.config import ModelConfig, load_config
    from vitflow.models import load_pretrained

    model = load_pretrained(ModelConfig(source=source) if source else load_config().model, ["a", "b"], image_size)
    model = model.cuda().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, image_size, image_size, device="cuda"))
    return counter.get_total_flops() / 2


def synthetic_cache(work: Path, count: int, image_size: int) -> Path:
    """`count` random 32x32 images in 10 classes as an .npz, preprocessed for the default model at `image_size`."""
    from vitflow.config import load_config
    from vitflow.data.cache import preprocess_dataset
    from vitflow.data.manifest import build_manifest, class_labels
    from vitflow.models import load_pretrained

    npz = work / f"random-{count}.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, train_images=rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
             train_labels=rng.integers(0, 10, count), label_names=np.array([f"class{index}" for index in range(10)]))
    manifest = build_manifest(npz, 0.1, 0.0, seed=0)
    data_config = load_pretrained(load_config().model, image_size=image_size).data_config
    return preprocess_dataset(manifest, npz, data_config, class_labels(manifest), work / "cache", progress=False)


def measure(name: str, cache: Path, overrides: list[str], evaluate: bool, flops: float, peak: float | None) -> dict:
    clock = StepClock()
    torch.cuda.reset_peak_memory_stats()
    record = train_full(cache, CUDA + overrides, evaluate=evaluate, observer=clock)
    steady = clock.steps * record["batch_size"] / clock.seconds if clock.steps else float("nan")
    row = {"data": name, "batch": record["batch_size"], "loader workers": record["loader_workers"],
           "precision": record["precision"], "images x epochs": record["train_images"] * record["epochs"],
           "train s": record["train_s"], "img/s (whole fit)": record["images_per_s"], "img/s (steady)": steady,
           "peak GPU GB": torch.cuda.max_memory_allocated() / 1e9,
           "MFU %": 100 * 3 * flops * steady / peak if peak else float("nan"),
           "test accuracy": record["test_accuracy"]}
    print(", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                    for key, value in row.items()), flush=True)
    return row


def flow_seconds() -> float:
    """Wall time of `vitflow run --set train.device=cuda` in a scratch work directory and MLflow store."""
    scratch = Path(tempfile.mkdtemp(prefix="vitflow-bench-gpu-flow-"))
    env = {**os.environ, "VITFLOW_WORK_DIR": str(scratch / "work"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sys; from vitflow.cli import main; sys.exit(main())", "run",
                    "--set", "train.device=cuda"], check=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--images", type=int, default=16_384, help="synthetic set size")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--configs", default="16:1,128:8,256:12", help="batch size:loader workers, comma-separated")
    parser.add_argument("--peak-flops", type=float, help="the GPU's peak bf16 FLOP/s (default: from a table by name)")
    parser.add_argument("--flow", action="store_true", help="also time the default flow on the GPU")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with "
                 "an NVIDIA GPU")
    gpu = torch.cuda.get_device_name()
    peak = args.peak_flops or next((flops for key, flops in PEAK_BF16.items() if key in gpu), None)
    flops = forward_flops(None, args.image_size)

    cache, _ = shipped_cache(args.image_size)
    rows = [measure("ants vs bees", cache, [], True, flops, peak)]
    with tempfile.TemporaryDirectory(prefix="vitflow-bench-gpu-") as work:
        synthetic = synthetic_cache(Path(work), args.images, args.image_size)
        for config in args.configs.split(","):
            batch, workers = config.split(":")
            rows.append(measure(f"synthetic {args.images:,}", synthetic,
                                ["train.epochs=1", f"train.batch_size={batch}", f"train.loader_workers={workers}"],
                                False, flops, peak))
    print(f"\nmachine: {machine()}; GPU: {gpu}, peak bf16 {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    print(f"full, params.yaml with train.device=cuda, train.precision=auto, {args.image_size} px; forward "
          f"{flops / 1e9:.2f} GFLOP per image; steady: optimizer steps after the first {WARMUP_STEPS}, "
          "within epochs\n")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4g"))
    best = max(row["img/s (steady)"] for row in rows[1:])
    print(f"\nbest steady training throughput {best:,.0f} images/s (target >= 2,000 on one H100/H200)")
    if args.flow:
        print(f"default flow (vitflow run --set train.device=cuda): {flow_seconds():.0f} s wall time")


if __name__ == "__main__":
    main()

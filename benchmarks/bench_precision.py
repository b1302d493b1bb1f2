"""Benchmark reduced-precision exports and attention rollout, and print tables for the README.

    uv run python -m benchmarks.bench_precision [--model-dir DIR] [--cache DIR]

Defaults: the local registry's champion and the newest preprocessed cache in .vitflow/cache.
For each precision: latency per image at batch 1, throughput at batch 32, size on disk, test
accuracy and top-1 agreement with FP32. On a machine with a GPU, FP16 and BF16 run there.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.machine import machine
from vitflow.config import load_config
from vitflow.data.cache import is_readable_cache, load_split
from vitflow.data.images import normalize
from vitflow.explain.heatmaps import explain
from vitflow.export import benchmark_latency, export_and_verify, weights_bytes
from vitflow.models import load_model
from vitflow.paths import work_dir
from vitflow.precision import load_exported
from vitflow.serving import logged_model_dir
from vitflow.tracking import configure_mlflow


def champion_dir() -> str:
    configure_mlflow()
    return str(logged_model_dir(f"models:/{load_config().registry.model_name}@champion"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model-dir", help="a saved vitflow checkpoint (default: the champion)")
    parser.add_argument("--cache", help="preprocessed data (default: newest in .vitflow/cache)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    model_dir = args.model_dir or champion_dir()
    caches = [path for path in (work_dir() / "cache").glob("[!.]*") if is_readable_cache(path)]
    cache = args.cache or str(max(caches, key=lambda path: path.stat().st_mtime))
    test = load_split(cache, "test")
    out_root = Path(tempfile.mkdtemp(prefix="vitflow-precision-"))

    records = {record["precision"]: record for record in export_and_verify(model_dir, cache, out_root)}
    rows = []
    for precision in ("fp32", "fp16", "bf16", "int8"):
        runner = load_exported(model_dir if precision == "fp32" else out_root / precision)
        batch1 = benchmark_latency(runner, runner.data_config, batch_size=1, repeats=args.repeats)
        batch32 = benchmark_latency(runner, runner.data_config, batch_size=32, repeats=max(1, args.repeats // 5))
        record = records.get(precision, {})
        accuracy = record.get("accuracy", next(iter(records.values()))["fp32_accuracy"])
        rows.append({"precision": precision, "compute": runner.compute,
                     "batch-1 ms/img": batch1["ms_per_image"], "batch-32 img/s": batch32["images_per_second"],
                     "size MB": weights_bytes(model_dir if precision == "fp32" else out_root / precision) / 1e6,
                     "test accuracy": accuracy, "top-1 agreement": record.get("top1_agreement", 1.0),
                     "max |Δlogit|": record.get("max_abs_logit_diff", 0.0)})
    table = pd.DataFrame(rows).set_index("precision")
    table["throughput vs fp32"] = table["batch-32 img/s"] / table.loc["fp32", "batch-32 img/s"]

    model = load_model(model_dir).eval()
    pixels = normalize(test.images[:8], model.data_config)
    explain(model.model, pixels[:1])  # warm-up
    start = time.perf_counter()
    explain(model.model, pixels)
    rollout_seconds = (time.perf_counter() - start) / len(pixels)

    print(f"machine: {machine()}; cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"model: {model_dir} ({model.data_config.image_size}px), test images: {len(test.labels)}\n")
    print(table.to_markdown(floatfmt=".4g"))
    print(f"\nattention rollout: {rollout_seconds:.3f} s per image (batch of {len(pixels)}, eager attention)")


if __name__ == "__main__":
    main()

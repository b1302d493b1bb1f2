"""Benchmark preprocessing at scale on a synthetic CIFAR-shaped set, and print a table for the README.

    uv run python -m benchmarks.bench_preprocess [--images 50000] [--size 224] [--work DIR]

Builds 50,000 random RGB 32x32 images in 100 classes (train/test as CIFAR splits them), once as a MedMNIST-
layout .npz and once as a folder of PNGs, then for each source: the manifest, and the preprocessing into the
cache with one decoding process and with one per core, and the re-run on unchanged data (a cache hit). Each
measurement runs in a fresh process, so its peak RSS is its own (the decoding workers are forks of it:
their pages are its pages until written).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.machine import machine

CLASSES = 100


def build_sets(work: Path, count: int) -> tuple[Path, Path]:
    """The same images as `cifar.npz` and as `cifar/{train,test}/<class>/<index>.png`."""
    npz, folder = work / "cifar.npz", work / "cifar"
    if npz.is_file() and folder.is_dir():
        return npz, folder
    rng = np.random.default_rng(0)
    test_count = count // 6
    arrays = {}
    for split, n in (("train", count - test_count), ("test", test_count)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, CLASSES, (n, 1))
    np.savez(npz, **arrays, label_names=np.array([f"class{index:03d}" for index in range(CLASSES)]))
    from PIL import Image

    for split in ("train", "test"):
        for index, (pixels, label) in enumerate(zip(arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0],
                                                    strict=True)):
            out = folder / split / f"class{label:03d}" / f"{index}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(out)
    return npz, folder


def measure(data: str, size: int, workers: int, cache_dir: str) -> dict:
    """In this process: the manifest and the cache of `data`; seconds, peak RSS and cache size."""
    from vitflow.data.cache import preprocess_dataset
    from vitflow.data.manifest import build_manifest, class_labels
    from vitflow.models import DataConfig

    start = time.perf_counter()
    manifest = build_manifest(data, 0.1, 0.0, seed=0)
    manifest_seconds = time.perf_counter() - start
    labels = class_labels(manifest)
    data_config = DataConfig(size, round(size / 0.875), (0.5,) * 3, (0.5,) * 3)
    start = time.perf_counter()
    preprocess_dataset(manifest, data, data_config, labels, cache_dir, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    return {"images": int((manifest["status"] == "ok").sum()), "manifest_s": manifest_seconds,
            "preprocess_s": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cache_gb": sum(path.stat().st_size for path in Path(cache_dir).iterdir()) / 1e9}


def in_fresh_process(data: Path, size: int, workers: int, cache_dir: Path) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_preprocess", "--measure", str(data), "--size", str(size),
               "--workers", str(workers), "--cache", str(cache_dir)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--work", type=Path, help="where the data and caches go (default: a temporary folder)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.size, args.workers, args.cache)))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="vitflow-bench-preprocess-"))
    work.mkdir(parents=True, exist_ok=True)
    npz, folder = build_sets(work, args.images)
    cores = os.cpu_count() or 1
    rows = []
    for name, data in (("npz", npz), ("image folder", folder)):
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        single = in_fresh_process(data, args.size, 0, cache)
        shutil.rmtree(cache)
        parallel = in_fresh_process(data, args.size, cores, cache)
        again = in_fresh_process(data, args.size, cores, cache)
        shutil.rmtree(cache)
        for label, record in (("1 process", single), (f"{cores} workers", parallel), ("re-run (cache hit)", again)):
            rows.append({"source": name, "preprocessing": label, "images": record["images"],
                         "manifest s": record["manifest_s"], "preprocess s": record["preprocess_s"],
                         "images/s": record["images"] / record["preprocess_s"],
                         "peak RSS MB": record["peak_rss_mb"],
                         "cache GB": record["cache_gb"]})
        print(f"{name}: {cores} workers are {single['preprocess_s'] / parallel['preprocess_s']:.2f}x one process; "
              f"the re-run is {parallel['preprocess_s'] / again['preprocess_s']:.0f}x faster")
    print(f"\n{args.images:,} synthetic 32x32 RGB images, {CLASSES} classes, preprocessed at {args.size} px; "
          f"{machine()}\n")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()

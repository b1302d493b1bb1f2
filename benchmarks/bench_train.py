"""Benchmark vitflow's training: bf16 against fp32, and memory against dataset size; print tables for the README.

    uv run python -m benchmarks.bench_train [--parts precision,memory] [--epochs 5] [--images 2000,20000]

precision: `full` on the shipped ants vs bees (the flow's cache at 168 px, built when missing) in fp32 and in
bf16: training images/s and test accuracy. memory: peak RSS of one epoch of `full` on synthetic sets of
random 32x32 RGB images in 10 classes (an .npz preprocessed by vitflow's preprocess_dataset at 64 px) with a
small randomly initialised ViT saved locally, one set against a ten times larger one. Every training runs in a
fresh process, so its peak RSS is its own; the DataLoader worker's peak is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.machine import machine
from benchmarks.runs import in_fresh_process, load_average, shipped_cache, train_full, use_threads

CLASSES = 10
SIDE = 64  # the tiny ViT's input: 32x32 images upscaled, 8x8 patches


def tiny_vit(directory: Path) -> Path:
    """A randomly initialised ViT (hidden 192, 4 layers, 8 px patches, 64 px input) saved as a checkpoint."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    if not (directory / "config.json").is_file():
        torch.manual_seed(0)
        config = ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                           patch_size=8, image_size=SIDE, num_labels=CLASSES)
        ViTForImageClassification(config).save_pretrained(directory)
        ViTImageProcessor(size={"height": SIDE, "width": SIDE}, image_mean=[0.5] * 3,
                          image_std=[0.5] * 3).save_pretrained(directory)
    return directory


def synthetic_cache(work: Path, count: int, model_dir: Path) -> Path:
    """`count` random 32x32 RGB images in CLASSES classes as an .npz, preprocessed into a cache (val carved)."""
    from vitflow.data.cache import preprocess_dataset
    from vitflow.data.manifest import build_manifest, class_labels
    from vitflow.models import load_model

    npz, cache_dir = work / f"random-{count}.npz", work / f"cache-{count}"
    if not npz.is_file():
        rng = np.random.default_rng(count)
        np.savez(npz, train_images=rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
                 train_labels=rng.integers(0, CLASSES, count),
                 label_names=np.array([f"class{index}" for index in range(CLASSES)]))
    manifest = build_manifest(npz, 0.1, 0.0, seed=0)
    data_config = load_model(str(model_dir)).data_config
    return preprocess_dataset(manifest, npz, data_config, class_labels(manifest), cache_dir, progress=False)


class MemorySampler(threading.Thread):
    """The peak anonymous and file-backed RSS of this process and of its children, read from /proc every 0.2 s
    (file-backed pages, e.g. the memory-mapped cache, are page cache the kernel can drop)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks = {"anon_mb": 0.0, "file_mb": 0.0, "worker_anon_mb": 0.0, "worker_file_mb": 0.0}
        self.stopped = threading.Event()

    @staticmethod
    def rss(pid: str) -> tuple[float, float]:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        except OSError:  # the process ended meanwhile
            return 0.0, 0.0
        return tuple(int(fields.get(key, "0 kB").split()[0]) / 1024 for key in ("RssAnon", "RssFile"))

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            children = " ".join(path.read_text() for path in Path("/proc/self/task").glob("*/children")).split()
            for prefix, pids in (("", ["self"]), ("worker_", children)):
                for pid in pids:
                    for key, value in zip(("anon_mb", "file_mb"), self.rss(pid), strict=True):
                        self.peaks[prefix + key] = max(self.peaks[prefix + key], value)


def measure_memory(cache_dir: str, model_dir: str, precision: str) -> dict:
    """One epoch of `full` on the cache, in this process, with its memory sampled."""
    sampler = MemorySampler()
    sampler.start()
    record = train_full(cache_dir, ["train.epochs=1", f"train.precision={precision}", "train.device=cpu"],
                        model_source=model_dir, evaluate=False)
    sampler.stopped.set()
    sampler.join()
    return {**record, **sampler.peaks}


def precision_part(epochs: int) -> None:
    cache, _ = shipped_cache(168)
    rows = []
    for precision in ("fp32", "bf16"):
        record = in_fresh_process("benchmarks.bench_train", ["--measure", "precision", "--cache", str(cache),
                                                             "--precision", precision, "--epochs", str(epochs)])
        rows.append(record)
        print(f"{precision}: {record['train_s']:.1f} s, test accuracy {record['test_accuracy']:.4f} "
              f"(load {record['load_before']} -> {record['load_after']})", flush=True)
    table = pd.DataFrame(rows).set_index("precision")
    speed = table.loc["bf16", "images_per_s"] / table.loc["fp32", "images_per_s"]
    points = 100 * (table.loc["bf16", "test_accuracy"] - table.loc["fp32", "test_accuracy"])
    print(f"\nmachine: {machine()}")
    print(f"full on the shipped ants vs bees at 168 px, {rows[0]['train_images']} train images x {epochs} epochs "
          "(a validation pass after each); img/s: train images x epochs / wall time of fine_tune\n")
    print(table[["train_s", "images_per_s", "cpu_s", "test_accuracy", "best_epoch", "peak_rss_mb",
                 "load_before", "load_after"]].rename(columns={
                     "train_s": "train s", "images_per_s": "train img/s", "cpu_s": "CPU s",
                     "test_accuracy": "test accuracy", "best_epoch": "best epoch", "peak_rss_mb": "peak RSS MB",
                     "load_before": "load avg before", "load_after": "load avg after"}).to_markdown(floatfmt=".4g"))
    print(f"\nbf16 trains {speed:.2f}x the images/s of fp32 (target >= 1.6x); test accuracy {points:+.2f} points "
          "(target: within 1.5)\n")


def memory_part(counts: list[int], precision: str, work: Path) -> None:
    model_dir = tiny_vit(work / "tiny-vit")
    rows = []
    for count in counts:
        cache = synthetic_cache(work, count, model_dir)
        record = in_fresh_process("benchmarks.bench_train", ["--measure", "memory", "--cache", str(cache),
                                                             "--model", str(model_dir), "--precision", precision])
        rows.append({"images": count, **record})
        print(f"{count:,} images: peak RSS {record['peak_rss_mb']:.0f} MB, {record['train_s']:.1f} s "
              f"(load {record['load_before']} -> {record['load_after']})", flush=True)
    table = pd.DataFrame(rows).set_index("images")
    columns = {"train_images": "train images", "train_s": "train s", "peak_rss_mb": "peak RSS MB",
               "anon_mb": "of it anonymous MB", "worker_peak_rss_mb": "loader worker peak RSS MB",
               "worker_anon_mb": "worker anonymous MB", "worker_file_mb": "worker file-backed MB",
               "load_before": "load avg before", "load_after": "load avg after"}
    small, large = table.index.min(), table.index.max()
    print(f"\nmachine: {machine()}")
    print(f"one epoch of full, {table['precision'].iloc[0]}, a random-init ViT (hidden 192, 4 layers, 8 px patches) "
          f"on random 32x32 images upscaled to {SIDE} px, 10% carved for validation; peak RSS: ru_maxrss of the "
          "training process (anonymous: sampled RssAnon), the worker's from RUSAGE_CHILDREN and sampled\n")
    print(table[list(columns)].rename(columns=columns).to_markdown(floatfmt=".4g"))
    for column, name in (("peak_rss_mb", "training process"), ("worker_peak_rss_mb", "loader worker")):
        print(f"{name}: peak RSS {large:,} vs {small:,} images = "
              f"{table.loc[large, column] / table.loc[small, column]:.2f}x" +
              (" (target <= 1.2x)" if column == "peak_rss_mb" else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--parts", default="precision,memory", help="comma-separated: precision, memory")
    parser.add_argument("--epochs", type=int, default=5, help="precision part: epochs per training")
    parser.add_argument("--images", default="2000,20000", help="memory part: synthetic set sizes")
    parser.add_argument("--precision", default="auto", help="memory part: train.precision")
    parser.add_argument("--threads", type=int, help="torch threads per training (default: one per core)")
    parser.add_argument("--work", type=Path, help="memory part: where the sets and caches go (default: a temporary "
                        "folder, removed at the end)")
    parser.add_argument("--measure", choices=["precision", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    use_threads(args.threads)
    if args.measure == "precision":
        print(json.dumps(train_full(args.cache, [f"train.epochs={args.epochs}", f"train.precision={args.precision}",
                                                 "train.device=cpu"])))
        return
    if args.measure == "memory":
        print(json.dumps(measure_memory(args.cache, args.model, args.precision)))
        return

    print(f"load average at start: {load_average()}", flush=True)
    parts = args.parts.split(",")
    if "precision" in parts:
        precision_part(args.epochs)
    if "memory" in parts:
        work = args.work or Path(tempfile.mkdtemp(prefix="vitflow-bench-train-"))
        work.mkdir(parents=True, exist_ok=True)
        memory_part([int(count) for count in args.images.split(",")], args.precision, work)
        if args.work is None:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()

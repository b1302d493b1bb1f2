"""What the training benchmarks share: the flow's cache of the shipped data, one `full` training measured, a
measurement in a fresh process, and the load averages that say how busy the machine was meanwhile."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, as `uptime` prints them."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def use_threads(threads: int | None) -> None:
    """Compute with `threads` intra-op threads here and in the processes started from here (None: torch's default,
    one per core). On a shared machine whose load exceeds its cores, one thread avoids threads waiting on each
    other at every operation."""
    if threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (e.g. DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peak_rss_mb() -> tuple[float, float]:
    """Peak RSS of this process, and the largest of its finished children's, in MB."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def data_version(data_path: Path) -> str:
    """The version the flow records for `data_path`: the md5 in its .dvc file, else a content hash."""
    dvc_file = data_path.with_name(f"{data_path.name}.dvc")
    if dvc_file.is_file():
        return yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
    from vitflow.data.versioning import content_hash

    return content_hash(data_path)


def shipped_cache(image_size: int | None, overrides: list[str] | None = None):
    """(cache directory, manifest) of `data.path` (the shipped ants vs bees) for `model.source` at `image_size`
    px: the flow's own cache under .vitflow/cache/<key>, built the way `vitflow run` builds it when missing."""
    from vitflow.config import load_config
    from vitflow.data.cache import cache_key, preprocess_dataset
    from vitflow.data.manifest import build_manifest, class_labels
    from vitflow.models import load_pretrained
    from vitflow.paths import project_path, work_dir

    config = load_config(overrides=overrides)
    data, data_path = config.data, project_path(config.data.path)
    manifest = build_manifest(data_path, data.val_fraction, data.test_fraction, data.seed, data.label_names,
                              data.duplicates)
    labels = class_labels(manifest)
    data_config = load_pretrained(config.model, image_size=image_size).data_config
    cache_dir = work_dir() / "cache" / cache_key(data_version(data_path), manifest, data_config, labels)
    cache_dir = preprocess_dataset(manifest, data_path, data_config, labels, cache_dir, data.workers, progress=False)
    return cache_dir, manifest


def train_full(cache_dir: Path | str, overrides: list[str], model_source: str | None = None,
               evaluate: bool = True, observer=None) -> dict:
    """`full` as the flow trains it (params.yaml with `overrides`; no per-epoch checkpoint) on the cache's train
    and val splits, its best epoch scored on the test split. The clock runs around `fine_tune` only."""
    import torch

    from vitflow.config import ModelConfig, load_config
    from vitflow.data.cache import load_labels, load_split
    from vitflow.evaluation import evaluate_model
    from vitflow.models import load_pretrained
    from vitflow.training.engine import loader_workers
    from vitflow.training.loop import fine_tune
    from vitflow.training.strategies import resolve

    config = load_config(overrides=overrides)
    resolved = resolve(config.train, "full")
    model = ModelConfig(source=model_source) if model_source else config.model
    train, val = load_split(cache_dir, "train"), load_split(cache_dir, "val")
    torch.manual_seed(resolved.settings.seed)  # the new head's initialisation, as train_from_cache seeds it
    classifier = load_pretrained(model, load_labels(cache_dir), train.images.shape[-1])
    with tempfile.TemporaryDirectory(prefix="vitflow-bench-train-") as out:
        load_before, cpu_before, start = load_average(), cpu_seconds(), time.perf_counter()
        result = fine_tune(classifier, train, val, resolved, out, progress=False, observer=observer)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_before
        load_after = load_average()
        accuracy = (evaluate_model(classifier, load_split(cache_dir, "test"), Path(out) / "eval",
                                   config.evaluate.batch_size).metrics["test_accuracy"] if evaluate else None)
    images = len(train.labels) * len(result.history)
    own_rss, worker_rss = peak_rss_mb()
    return {"precision": result.precision, "device": result.device, "train_images": len(train.labels),
            "epochs": len(result.history), "batch_size": resolved.settings.batch_size,
            "loader_workers": loader_workers(resolved.settings, torch.device(result.device)), "train_s": seconds,
            "images_per_s": images / seconds,
            "cpu_s": cpu, "threads": torch.get_num_threads(),
            "test_accuracy": accuracy, "best_epoch": result.best_epoch,
            "val_accuracy": result.history[result.best_epoch - 1]["val_accuracy"],
            "peak_rss_mb": own_rss, "worker_peak_rss_mb": worker_rss,
            "load_before": load_before, "load_after": load_after}


def in_fresh_process(module: str, args: list[str]) -> dict:
    """Run `python -m module *args` (a script's hidden measuring mode) and return the JSON of its last line."""
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{module} {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])

"""Decode, convert to RGB, resize and crop every usable image once, and cache the result.

In: the manifest from `vitflow.data.manifest` and the model's `DataConfig`.
Out: a `.safetensors` file with, per split, uint8 images [N, 3, S, S] and int64 labels,
keyed by data version and preprocessing config, so every strategy, epoch and re-run shares
it. Normalisation and training-time augmentation (`vitflow.data.images`) run on these tensors on the fly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from vitflow.data.images import load_image
from vitflow.data.sources import detect_source
from vitflow.data.sources.base import SPLITS
from vitflow.errors import VitflowError
from vitflow.models import DataConfig


@dataclass(frozen=True)
class SplitTensors:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]
    paths: list[str]


def cache_key(data_version: str, manifest: pd.DataFrame, data_config: DataConfig, labels: list[str]) -> str:
    """Fingerprint of what the cached tensors depend on: data, splits, labels and preprocessing."""
    usable = manifest[manifest["status"] == "ok"]
    fingerprint = {
        "data_version": data_version,
        "rows": usable[["path", "label", "split", "checksum"]].sort_values("path").to_numpy().tolist(),
        "labels": labels,
        "data_config": asdict(data_config),
    }
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def preprocess_dataset(manifest: pd.DataFrame, data_path: Path | str, data_config: DataConfig, labels: list[str],
                       cache_file: Path | str, progress: bool = True) -> Path:
    """Decode every usable image in the manifest once and save all splits to `cache_file`.

    Skips the work when a readable `cache_file` already exists (its name carries the cache key); a broken
    one (a crash or a full disk mid-write) is removed and rebuilt.
    """
    cache_file = Path(cache_file)
    if cache_file.is_file() and is_readable_cache(cache_file):
        return cache_file
    data_path = Path(data_path)
    source = detect_source(data_path)
    label_index = {label: i for i, label in enumerate(labels)}
    tensors: dict[str, torch.Tensor] = {}
    paths: dict[str, list[str]] = {}
    usable = manifest[manifest["status"] == "ok"].sort_values("path")
    for split in SPLITS:
        rows = usable[usable["split"] == split]
        if rows.empty:
            continue
        images = [load_image(source.open(data_path, key), data_config)
                  for key in tqdm(rows["path"], desc=f"preprocess {split}", disable=not progress, leave=False)]
        tensors[f"{split}.images"] = torch.stack(images)
        tensors[f"{split}.labels"] = torch.tensor([label_index[label] for label in rows["label"]], dtype=torch.int64)
        paths[split] = rows["path"].tolist()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial_file = cache_file.with_name(f".{cache_file.name}.partial")
    save_file(tensors, partial_file, metadata={"paths": json.dumps(paths), "labels": json.dumps(labels)})
    partial_file.replace(cache_file)
    return cache_file


def is_readable_cache(cache_file: Path | str) -> bool:
    """Whether `cache_file` opens as safetensors with its metadata and every listed split's tensors."""
    try:
        with safe_open(str(cache_file), framework="pt") as handle:
            paths = json.loads(handle.metadata()["paths"])
            json.loads(handle.metadata()["labels"])
            return all({f"{split}.images", f"{split}.labels"} <= set(handle.keys()) for split in paths)
    except Exception:  # safetensors raises its own error types for a truncated header or body
        return False


def load_split(cache_file: Path | str, split: str) -> SplitTensors:
    """One split from a preprocessed cache file (only that split is read)."""
    with safe_open(str(cache_file), framework="pt") as handle:
        paths = json.loads(handle.metadata()["paths"])
        if split not in paths:
            raise VitflowError(f"{cache_file}: the data has no {split!r} split; check data.* fractions in params.yaml")
        return SplitTensors(handle.get_tensor(f"{split}.images"), handle.get_tensor(f"{split}.labels"), paths[split])


def load_labels(cache_file: Path | str) -> list[str]:
    """The class names of a preprocessed cache file, in label-index order."""
    with safe_open(str(cache_file), framework="pt") as handle:
        return json.loads(handle.metadata()["labels"])

"""Decode, convert to RGB, resize and crop every usable image once, and cache the result on disk.

In: the manifest from `vitflow.data.manifest` and the model's `DataConfig`.
Out: a cache directory, named by `cache_key`, so every strategy, epoch and re-run shares it:
`<split>.images.npy` (uint8 [N, 3, S, S]) and `<split>.labels.npy` (int64 [N]) per split, and `meta.json`
(sample keys per split, class names). Splits are read memory-mapped, a batch at a time as they are indexed.
Normalisation and training-time augmentation (`vitflow.data.images`) run on these tensors on the fly.

Images are decoded in `workers` processes (a torch DataLoader) and streamed to disk in order, so memory
stays flat whatever the number of images. The cache is built in a hidden folder and renamed into place
once complete; a cache that fails `is_readable_cache` (a crash or a full disk mid-write) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vitflow.data.images import load_image
from vitflow.data.sources import Source, detect_source
from vitflow.data.sources.base import SPLITS
from vitflow.errors import VitflowError
from vitflow.models import DataConfig

META_FILE = "meta.json"
FORMAT = "vitflow-cache-2"
DECODE_BATCH = 64  # images per worker hand-off: large enough to amortise it, small enough to keep memory flat
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitTensors:
    images: torch.Tensor  # uint8 [N, 3, S, S], memory-mapped from the cache
    labels: torch.Tensor  # int64 [N]
    paths: list[str]


def worker_processes(requested: int) -> int:
    """`requested` DataLoader worker processes, or none inside a daemonic process (a Dask or multiprocessing
    worker), which may not start children: the work then runs in this process."""
    return 0 if multiprocessing.current_process().daemon else requested


def cache_key(data_version: str, manifest: pd.DataFrame, data_config: DataConfig, labels: list[str]) -> str:
    """Fingerprint of what the cached tensors depend on: data, splits, labels, preprocessing and cache format."""
    usable = manifest[manifest["status"] == "ok"]
    fingerprint = {
        "format": FORMAT,
        "data_version": data_version,
        "rows": usable[["path", "label", "split", "checksum"]].sort_values("path").to_numpy().tolist(),
        "labels": labels,
        "data_config": asdict(data_config),
    }
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def preprocess_dataset(manifest: pd.DataFrame, data_path: Path | str, data_config: DataConfig, labels: list[str],
                       cache_dir: Path | str, workers: int | None = None, progress: bool = True) -> Path:
    """Decode every usable image in the manifest once and write all splits to `cache_dir`; returns it.

    `workers`: decoding processes (None: one per core; 0: decode in this process). Skips the work when a
    readable cache is already there; a broken one is removed and rebuilt.
    """
    cache_dir = Path(cache_dir)
    if is_readable_cache(cache_dir):
        return cache_dir
    if cache_dir.exists():
        log.warning("%s: incomplete or corrupt cache; removed, preprocessing again", cache_dir)
        shutil.rmtree(cache_dir)
    data_path = Path(data_path)
    source = detect_source(data_path)
    workers = worker_processes((os.cpu_count() or 1) if workers is None else workers)
    label_index = {label: i for i, label in enumerate(labels)}
    usable = manifest[manifest["status"] == "ok"].sort_values("path")
    staging = cache_dir.with_name(f".{cache_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    paths: dict[str, list[str]] = {}
    for split in SPLITS:
        rows = usable[usable["split"] == split]
        if rows.empty:
            continue
        paths[split] = rows["path"].tolist()
        _write_images(staging / f"{split}.images.npy", _Decode(source, data_path, paths[split], data_config),
                      workers, f"preprocess {split}" if progress else None)
        np.save(staging / f"{split}.labels.npy", np.array([label_index[label] for label in rows["label"]], np.int64))
    meta = {"format": FORMAT, "labels": labels, "image_size": data_config.image_size, "paths": paths}
    (staging / META_FILE).write_text(json.dumps(meta))
    try:
        staging.rename(cache_dir)
    except OSError:  # another run finished the same cache first: keep theirs
        shutil.rmtree(staging)
        if not is_readable_cache(cache_dir):
            raise
    return cache_dir


class _Decode(Dataset):
    """Sample i of `keys` decoded and resized: uint8 [3, S, S]."""

    def __init__(self, source: Source, data_path: Path, keys: list[str], data_config: DataConfig):
        self.source, self.data_path, self.keys, self.data_config = source, data_path, keys, data_config

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image(self.source.open(self.data_path, self.keys[index]), self.data_config)


def _write_images(out_file: Path, decode: _Decode, workers: int, progress: str | None) -> None:
    """Stream the decoded images, in order, into a .npy file of shape [N, 3, S, S]."""
    side = decode.data_config.image_size
    loader = DataLoader(decode, batch_size=DECODE_BATCH, num_workers=workers,
                        prefetch_factor=2 if workers else None)
    with out_file.open("wb") as handle:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (len(decode), 3, side, side)}
        np.lib.format.write_array_header_1_0(handle, header)
        for batch in tqdm(loader, desc=progress, disable=progress is None, leave=False, unit="batch"):
            handle.write(batch.numpy().tobytes())


def is_readable_cache(cache_dir: Path | str) -> bool:
    """Whether `cache_dir` is a complete cache: its meta file, and per split an images file of the full size
    and the listed number of samples, and as many labels."""
    try:
        meta = json.loads((Path(cache_dir) / META_FILE).read_text())
        if meta["format"] != FORMAT:
            return False
        side = meta["image_size"]
        for split, keys in meta["paths"].items():
            images = np.load(Path(cache_dir) / f"{split}.images.npy", mmap_mode="r")  # raises when truncated
            labels = np.load(Path(cache_dir) / f"{split}.labels.npy")
            if images.shape != (len(keys), 3, side, side) or labels.shape != (len(keys),):
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):  # missing, truncated, or not what this version writes
        return False


def load_split(cache_dir: Path | str, split: str) -> SplitTensors:
    """One split of a cache: the images memory-mapped (read as they are indexed), labels and sample keys."""
    cache_dir = Path(cache_dir)
    paths = _meta(cache_dir)["paths"]
    if split not in paths:
        raise VitflowError(f"{cache_dir}: the data has no {split!r} split; check data.* fractions in params.yaml")
    images = np.load(cache_dir / f"{split}.images.npy", mmap_mode="c")  # copy-on-write: the file is never changed
    return SplitTensors(torch.from_numpy(images), torch.from_numpy(np.load(cache_dir / f"{split}.labels.npy")),
                        paths[split])


def load_labels(cache_dir: Path | str) -> list[str]:
    """The class names of a cache, in label-index order."""
    return _meta(Path(cache_dir))["labels"]


def _meta(cache_dir: Path) -> dict:
    try:
        return json.loads((cache_dir / META_FILE).read_text())
    except (OSError, ValueError):
        raise VitflowError(f"{cache_dir}: not a preprocessed cache; run the preprocess step again") from None

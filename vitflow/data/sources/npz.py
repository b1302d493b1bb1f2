"""A NumPy `.npz` in the MedMNIST layout: `{split}_images` uint8 [N, H, W] or [N, H, W, C] and `{split}_labels`
[N] or [N, 1] integer class indices, for the splits among train/val/test it has (train required).

Class names come from `label_names` (passed in, from `data.label_names`), else a `label_names` array in the
file, else a sidecar `<file>.json` holding {"label_names": [...]}, else the indices themselves. The key of a
sample is "<split>/<index>".
"""

from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from vitflow.data.sources.base import SPLITS, Listing, Source
from vitflow.errors import VitflowError


class NumpyArrays(Source):
    name = "npz"
    description = "a NumPy .npz with {split}_images and {split}_labels arrays (the MedMNIST layout)"

    def matches(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".npz"

    def list(self, path: Path, label_names: list[str] | None = None) -> Listing:
        arrays = _arrays(path, path.stat().st_mtime_ns)
        splits = [split for split in SPLITS if f"{split}_images" in arrays]
        if "train" not in splits:
            raise VitflowError(f"{path}: no 'train_images' array (has {', '.join(sorted(arrays)) or 'none'}); "
                               "save the training images as train_images and their classes as train_labels")
        labels = {split: _labels(path, arrays, split) for split in splits}
        names = _class_names(path, arrays, label_names, max(int(values.max()) for values in labels.values()) + 1)
        entries = [(f"{split}/{index}", names[label], split, "")
                   for split in splits for index, label in enumerate(labels[split].tolist())]
        return Listing(entries, set(splits))

    def open(self, path: Path, key: str) -> io.BytesIO:
        split, index = key.split("/")
        pixels = _arrays(path, path.stat().st_mtime_ns)[f"{split}_images"][int(index)]
        if pixels.ndim == 3 and pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="png")
        encoded.seek(0)
        encoded.name = f"{path}[{key}]"
        return encoded

    def check(self, path: Path, usable: pd.DataFrame, rows: pd.DataFrame) -> None:
        classes = sorted(usable.loc[usable["split"] == "train", "label"].unique())
        if len(classes) < 2:
            raise VitflowError(f"{path}: train_labels holds {len(classes)} class(es) {classes}; need at least two")


@lru_cache(maxsize=2)
def _arrays(path: Path, modified_ns: int) -> dict[str, np.ndarray]:
    """Every array of the file, read once per version of it (`allow_pickle=False`: arrays only, no objects)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise VitflowError(f"{path}: not a readable .npz ({error}); write it with numpy.savez") from None


def _labels(path: Path, arrays: dict[str, np.ndarray], split: str) -> np.ndarray:
    images = arrays[f"{split}_images"]
    if f"{split}_labels" not in arrays:
        raise VitflowError(f"{path}: has {split}_images but no {split}_labels; add the class index of each image")
    labels = arrays[f"{split}_labels"]
    labels = labels[:, 0] if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise VitflowError(f"{path}: {split}_images is {images.dtype} {list(images.shape)}; expected uint8 "
                           "[N, H, W] or [N, H, W, 1 or 3]")
    if (labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer)
            or (len(labels) and labels.min() < 0)):
        raise VitflowError(f"{path}: {split}_labels is {labels.dtype} {list(arrays[f'{split}_labels'].shape)} for "
                           f"{len(images)} images; expected one class index (0, 1, ...) per image")
    return labels


def _class_names(path: Path, arrays: dict[str, np.ndarray], given: list[str] | None, count: int) -> list[str]:
    sidecar = path.with_suffix(".json")
    if given:
        names, origin = list(given), "data.label_names"
    elif "label_names" in arrays:
        names, origin = [str(name) for name in arrays["label_names"].tolist()], f"{path}: label_names"
    elif sidecar.is_file():
        names, origin = json.loads(sidecar.read_text()).get("label_names", []), f"{sidecar}: label_names"
    else:
        return [str(index) for index in range(count)]
    if len(names) < count:
        raise VitflowError(f"{origin} names {len(names)} classes but the labels go up to {count - 1}; "
                           f"give one name per class index 0..{count - 1}")
    return names

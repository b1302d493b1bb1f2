"""An image folder: `<root>/<split>/<class>/<file>` (split folders among train/val/test; train required)
or `<root>/<class>/<file>` (everything is train). The key of a sample is its relative posix path."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vitflow.data.sources.base import SPLITS, Listing, Source
from vitflow.data.versioning import files_under
from vitflow.errors import VitflowError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})


class ImageFolder(Source):
    name = "folder"
    description = "an image folder (<split>/<class>/* or <class>/*)"

    def matches(self, path: Path) -> bool:
        return path.is_dir()

    def list(self, path: Path, label_names: list[str] | None = None) -> Listing:
        split_dirs = {name for name in _subdirs(path) if name in SPLITS}
        if split_dirs and "train" not in split_dirs:
            raise VitflowError(f"{path}: has {', '.join(sorted(split_dirs))}/ but no train/ folder; "
                               "add train/<class>/ or use the <class>/ layout")
        entries = []
        for file in files_under(path):
            key = file.relative_to(path).as_posix()
            entries.append((key, *_locate(file.relative_to(path).parts, split_dirs)))
        return Listing(entries, split_dirs)

    def open(self, path: Path, key: str) -> Path:
        return path / key

    def check(self, path: Path, usable: pd.DataFrame, rows: pd.DataFrame) -> None:
        """Every class folder has a usable image, there are two classes or more, and every split has the same."""
        split_dirs = sorted(name for name in _subdirs(path) if name in SPLITS)
        class_dirs = {split: _subdirs(path / split) for split in split_dirs} or {"train": _subdirs(path)}
        for split, classes in class_dirs.items():
            for label in classes:
                folder = path / split / label if split_dirs else path / label
                if not ((usable["split"] == split) & (usable["label"] == label)).any():
                    skipped = rows[(rows["split"] == split) & (rows["label"] == label)]
                    why = f"{len(skipped)} files skipped, e.g. {skipped['reason'].iloc[0]}" if len(skipped) else "empty"
                    raise VitflowError(f"{folder}: class folder has no usable images ({why}); add images or remove it")
        train_classes = class_dirs["train"]
        if len(train_classes) < 2:
            where = path / "train" if split_dirs else path
            raise VitflowError(f"{where}: found {len(train_classes)} class folder(s) {train_classes}; "
                               "need at least two, one folder per class")
        for split, classes in class_dirs.items():
            if classes != train_classes:
                raise VitflowError(f"{path / split}: classes {classes} differ from {path / 'train'} "
                                   f"{train_classes}; every split folder needs the same class folders")


def _locate(parts: tuple[str, ...], split_dirs: set[str]) -> tuple[str, str, str]:
    """(label, split, reason) a relative path's folders give it; a reason means skip."""
    if any(part.startswith(".") for part in parts):
        return "", "", "hidden file"
    if split_dirs:
        if parts[0] not in split_dirs:
            return "", "", f"outside the split folders ({', '.join(sorted(split_dirs))})"
        if len(parts) < 3:
            return "", "", "not inside a <split>/<class>/ folder"
        split, label = parts[0], parts[1]
    elif len(parts) < 2:
        return "", "", "not inside a <class>/ folder"
    else:
        split, label = "train", parts[0]
    if Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
        return label, split, f"not an image file (suffix {Path(parts[-1]).suffix or 'none'!r})"
    return label, split, ""


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

"""A table of image files: a `.csv` or `.parquet` with columns `path`, `label` and optionally `split`.

Paths are relative to the table's folder (absolute ones only if inside it): the images live beside the table,
so that folder is what DVC versions, and a path leaving it is refused. `split` values: train, val (or
validation), test; a row with another value, or none, is skipped with a reason, and so is a row whose file is
missing or that repeats an earlier path. Without a `split` column every row is train (val and test are carved).
The key of a sample is its path relative to the table's folder.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd

from vitflow.data.sources.base import Listing, Source
from vitflow.errors import VitflowError

SPLIT_VALUES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


class Table(Source):
    name = "table"
    description = "a .csv or .parquet table with path,label[,split] columns (paths relative to its folder)"

    def matches(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in (".csv", ".parquet")

    def list(self, path: Path, label_names: list[str] | None = None) -> Listing:
        table = _read(path)
        folder = path.parent.absolute()
        splits = table["split"] if "split" in table.columns else pd.Series("train", index=table.index)
        entries, seen = [], set()
        for value, label, split in zip(table["path"], table["label"], splits, strict=True):
            key = _key(path, folder, value) if value else ""
            entries.append((key, label, SPLIT_VALUES.get(split, ""), _skip_reason(folder, key, label, split, seen)))
            seen.add(key)
        if "split" not in table.columns:
            return Listing(entries)
        given = {SPLIT_VALUES[split] for split in splits if split in SPLIT_VALUES}
        if "train" not in given:
            raise VitflowError(f"{path}: column 'split' has no train rows (has "
                               f"{', '.join(sorted(set(splits))) or 'none'}); mark the training rows 'train'")
        return Listing(entries, given)

    def open(self, path: Path, key: str) -> Path | io.BytesIO:
        file = path.parent / key
        return file if file.is_file() else io.BytesIO()  # a skipped row (no such file): only checksummed

    def versioned_path(self, path: Path) -> Path:
        return path.parent

    def check(self, path: Path, usable: pd.DataFrame, rows: pd.DataFrame) -> None:
        classes = sorted(usable.loc[usable["split"] == "train", "label"].unique())
        if len(classes) < 2:
            raise VitflowError(f"{path}: column 'label' holds {len(classes)} class(es) {classes} in its usable "
                               "train rows; need at least two")


def _read(path: Path) -> pd.DataFrame:
    """The table with every cell as a string ("" where empty); a VitflowError when unreadable or a column is missing."""
    try:
        if path.suffix.lower() == ".csv":
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            table = pd.read_parquet(path)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        kind = "CSV" if path.suffix.lower() == ".csv" else "Parquet file"
        raise VitflowError(f"{path}: not a readable {kind} ({' '.join(str(error).split())})") from None
    has = ", ".join(map(str, table.columns)) or "none"
    if "path" not in table.columns:
        if path.suffix.lower() == ".parquet":
            raise VitflowError(f"{path}: no image column (a struct of bytes/path, as Hugging Face datasets write) "
                               f"and no 'path' column (has {has}); add a 'path' column of image files relative "
                               "to the table's folder")
        raise VitflowError(f"{path}: no 'path' column (has {has}); name the column of image files 'path'")
    if "label" not in table.columns:
        raise VitflowError(f"{path}: no 'label' column (has {has}); name the class column 'label'")
    columns = [column for column in ("path", "label", "split") if column in table.columns]
    return table[columns].astype(object).where(table[columns].notna(), "").astype(str)


def _key(path: Path, folder: Path, value: str) -> str:
    """`value` as a posix path relative to `folder`; a VitflowError when it leads outside it."""
    file = Path(os.path.normpath(folder / value))  # lexical: "a/../b.jpg" is b.jpg, "../b.jpg" leaves
    if not file.is_relative_to(folder) or file == folder:
        raise VitflowError(f"{path}: column 'path' has {value!r}, outside {folder} (the folder DVC versions with "
                           "the table); move the image into that folder and give its path relative to it")
    return file.relative_to(folder).as_posix()


def _skip_reason(folder: Path, key: str, label: str, split: str, seen: set[str]) -> str:
    """Why a row is skipped ("" when it is usable)."""
    if not key:
        return "empty path"
    if key in seen:
        return "path listed again (an earlier row has it)"
    if not label:
        return "empty label"
    if split not in SPLIT_VALUES:
        return f"split {split!r} is not train, val or test" if split else "empty split (use train, val or test)"
    if not (folder / key).is_file():
        return "file not found"
    return ""

"""The data-source registry: what `data.path` points at decides how samples are listed and read.

A new input format is one module with a `Source` subclass and one line in `SOURCES`. The first source
that matches wins: the Hugging Face one before the image folder (which matches any folder) and the table
(which matches any .csv or .parquet).
"""

from __future__ import annotations

from pathlib import Path

from vitflow.data.sources.base import Listing, Source
from vitflow.data.sources.folder import ImageFolder
from vitflow.data.sources.hf_datasets import HuggingFaceDataset
from vitflow.data.sources.npz import NumpyArrays
from vitflow.data.sources.table import Table
from vitflow.errors import VitflowError

SOURCES: dict[str, Source] = {source.name: source for source in (
    HuggingFaceDataset(),
    ImageFolder(),
    NumpyArrays(),
    Table(),
)}

__all__ = ["SOURCES", "Listing", "Source", "detect_source", "versioned_path"]


def detect_source(path: Path | str) -> Source:
    """The source that reads `path`; a VitflowError naming the path and the formats when none does."""
    path = Path(path)
    if not path.exists():
        raise VitflowError(f"{path}: data not found; set data.path or pass --data")
    for source in SOURCES.values():
        if source.matches(path):
            return source
    raise VitflowError(f"{path}: not a data source vitflow reads; pass one of: "
                       + "; ".join(source.description for source in SOURCES.values()))


def versioned_path(path: Path | str) -> Path:
    """The file or folder DVC versions for the data at `path`, as its source says (a table: the table's folder).

    While `path` is missing: its folder when that is missing too and has a .dvc file (a table whose folder
    DVC restores), else `path`.
    """
    path = Path(path)
    if path.exists():
        return detect_source(path).versioned_path(path)
    folder = path.parent
    return folder if not folder.exists() and folder.with_name(f"{folder.name}.dvc").is_file() else path

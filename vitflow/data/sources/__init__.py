"""The data-source registry: what `data.path` points at decides how samples are listed and read.

A new input format is one module with a `Source` subclass and one line in `SOURCES`.
"""

from __future__ import annotations

from pathlib import Path

from vitflow.data.sources.base import Listing, Source
from vitflow.data.sources.folder import ImageFolder
from vitflow.data.sources.npz import NumpyArrays
from vitflow.errors import VitflowError

SOURCES: dict[str, Source] = {source.name: source for source in (
    ImageFolder(),
    NumpyArrays(),
)}

__all__ = ["SOURCES", "Listing", "Source", "detect_source"]


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

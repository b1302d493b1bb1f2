"""What a data source does: list its samples with label and split, and open one sample's encoded image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, ClassVar

import pandas as pd

SPLITS = ("train", "val", "test")


@dataclass
class Listing:
    """Every sample a source found: one (key, label, split, reason) per sample; a reason means "skip it".
    The split is one of SPLITS.

    `splits`: the splits the source itself defines (the others are carved from train).
    """

    entries: list[tuple[str, str, str, str]]
    splits: set[str] = field(default_factory=set)


class Source:
    name: ClassVar[str]
    description: ClassVar[str]  # what it reads, for error messages

    def matches(self, path: Path) -> bool:
        raise NotImplementedError

    def list(self, path: Path, label_names: list[str] | None = None) -> Listing:
        """Every sample; `label_names`: class names for sources that store class indices (`data.label_names`)."""
        raise NotImplementedError

    def open(self, path: Path, key: str) -> Path | BinaryIO:
        """The encoded image of sample `key`: a file path or a binary stream."""
        raise NotImplementedError

    def versioned_path(self, path: Path) -> Path:
        """The file or folder DVC versions for the data at `path`: `path` itself, unless its samples live beside it."""
        return path

    def check(self, path: Path, usable: pd.DataFrame, rows: pd.DataFrame) -> None:
        """Raise a VitflowError for a layout that cannot be trained on, after the images were decoded."""

"""A Hugging Face `datasets` dataset: a folder written by `DatasetDict.save_to_disk` (splits train,
validation -> val, test) or `Dataset.save_to_disk` (all train); or Parquet with an image column as `datasets`
writes it: one file (all train), or a folder of them, each file's split named by its folder or the start of its
name (`data/train-00000-of-00001.parquet`, `test/0000.parquet`).

The image column is the one whose feature is `datasets.Image` (or its storage, a struct of bytes and path),
the label column the `ClassLabel` one (class names from its `names`; `data.label_names` is not used). Skipped
with a reason: rows of other splits, rows labelled -1 (no label) and images stored as a path only; a split
with no labelled rows (a Hub test set without answers) is carved from train like a missing one. The key of
a sample is "<split as stored>/<index>". Read with `datasets` itself; Parquet is converted once into vitflow's
work folder (`datasets`' cache), never beside the data.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from vitflow.data.sources.base import Listing, Source
from vitflow.data.versioning import files_under
from vitflow.errors import VitflowError
from vitflow.paths import work_dir

SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "test": "test"}
BESIDE_PARQUET = (".md", ".json")  # what a folder of Parquet files (a Hub dataset download) also holds


class HuggingFaceDataset(Source):
    name = "hf_datasets"
    description = ("a Hugging Face dataset (a save_to_disk folder, or Parquet with an Image and a ClassLabel "
                   "column)")

    def matches(self, path: Path) -> bool:
        if path.is_dir():
            return _saved_to_disk(path) or bool(_parquet_splits(path))
        return path.is_file() and path.suffix.lower() == ".parquet" and _parquet_has_images(path)

    def list(self, path: Path, label_names: list[str] | None = None) -> Listing:
        import pyarrow.compute as pc

        splits = _splits(path, _stamp(path))
        if "train" not in {SPLIT_NAMES.get(stored) for stored in splits}:
            raise VitflowError(f"{path}: no train split (has {', '.join(splits)}); name the training split 'train'")
        entries, labelled_splits = [], set()
        for stored, (dataset, image, label) in splits.items():
            split = SPLIT_NAMES.get(stored, "")
            columns = dataset.with_format("arrow")
            names = dataset.features[label].names
            no_bytes = pc.struct_field(columns[image], "bytes").is_null().to_pylist()
            for index, (value, missing) in enumerate(zip(columns[label].to_pylist(), no_bytes, strict=True)):
                labelled = value is not None and value >= 0
                entries.append((f"{stored}/{index}", names[value] if labelled else "", split,
                                _skip_reason(stored, split, labelled, missing)))
                if split and labelled:
                    labelled_splits.add(split)
        return Listing(entries, labelled_splits)

    def open(self, path: Path, key: str) -> io.BytesIO:
        stored, index = key.rsplit("/", 1)
        dataset, image, _ = _splits(path, _stamp(path))[stored]
        encoded = io.BytesIO(dataset[int(index)][image]["bytes"] or b"")  # no bytes: a skipped row
        encoded.name = f"{path}[{key}]"
        return encoded

    def check(self, path: Path, usable: pd.DataFrame, rows: pd.DataFrame) -> None:
        classes = sorted(usable.loc[usable["split"] == "train", "label"].unique())
        if len(classes) < 2:
            raise VitflowError(f"{path}: the usable train rows hold {len(classes)} class(es) {classes}; "
                               "need at least two")


def _skip_reason(stored: str, split: str, labelled: bool, missing_bytes: bool) -> str:
    """Why a row is skipped ("" when it is usable)."""
    if not split:
        return f"split {stored!r} is not train, validation or test"
    if not labelled:
        return "no label (-1)"
    return "image stored as a path only, not its bytes" if missing_bytes else ""


def _saved_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or all(
        (folder / name).is_file() for name in ("state.json", "dataset_info.json"))


def _parquet_splits(folder: Path) -> dict[str, list[Path]]:
    """{split name: its Parquet files, sorted} of a folder holding Parquet files and nothing else but
    README/JSON and hidden files; {} for any other folder (an image folder: it stops at the first image)."""
    found = []
    for file in folder.rglob("*"):
        relative = file.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue
        if file.suffix.lower() == ".parquet":
            found.append(relative)
        elif file.suffix.lower() not in BESIDE_PARQUET:
            return {}
    splits: dict[str, list[Path]] = {}
    for relative in sorted(found, key=Path.as_posix):
        named = [*relative.parent.parts, relative.stem.split("-")[0]]  # data/train-00000-of-00001, test/0000
        split = next((name for name in named if name in SPLIT_NAMES), named[-1])
        splits.setdefault(split, []).append(folder / relative)
    return splits


def _parquet_has_images(file: Path) -> bool:
    """Whether the file's schema has an image column: a `datasets.Image` feature or a struct of bytes and path."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(file)
    except (OSError, ValueError):  # not Parquet: the table source says so
        return False
    return any(_is_image_storage(field.type) for field in schema)


def _is_image_storage(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_struct(arrow_type) and {"bytes", "path"} <= {field.name for field in arrow_type}


def _stamp(path: Path) -> tuple:
    """What changes when the data is rewritten: every file's name, size and modification time."""
    return tuple((file.as_posix(), file.stat().st_size, file.stat().st_mtime_ns)
                 for file in ([path] if path.is_file() else files_under(path)))


@lru_cache(maxsize=2)
def _splits(path: Path, stamp: tuple) -> dict[str, tuple[Any, str, str]]:
    """{split as stored: (its `datasets.Dataset` with images left encoded, image column, label column)},
    read once per version of the data."""
    import datasets  # takes seconds: only when a dataset is read

    if path.is_dir() and _saved_to_disk(path):
        loaded = datasets.load_from_disk(str(path))
        loaded = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    else:
        files = {"train": [path]} if path.is_file() else _parquet_splits(path)
        loaded = dict(datasets.load_dataset("parquet", data_files={split: [str(file) for file in group]
                                                                     for split, group in files.items()},
                                            cache_dir=str(work_dir() / "hf-datasets")))
    splits = {}
    for stored, dataset in loaded.items():
        where = f"{path} [{stored}]"
        image = _one_column(where, dataset, _is_image_feature, "image",
                            "store the images in one datasets.Image column (dataset.cast_column(name, Image()))")
        label = _one_column(where, dataset, lambda feature: isinstance(feature, datasets.ClassLabel), "ClassLabel",
                            "make the class column a ClassLabel (dataset.class_encode_column(name)), and only that one")
        splits[stored] = (dataset.cast_column(image, datasets.Image(decode=False)), image, label)
    return splits


def _is_image_feature(feature: Any) -> bool:
    """A `datasets.Image` feature, or its storage (a struct of bytes and path) read without the feature."""
    import datasets

    return isinstance(feature, datasets.Image) or isinstance(feature, dict) and {"bytes", "path"} <= set(feature)


def _one_column(where: str, dataset: Any, wanted: Any, kind: str, fix: str) -> str:
    """The name of the one column whose feature `wanted` accepts; a VitflowError naming the columns otherwise."""
    found = [name for name, feature in dataset.features.items() if wanted(feature)]
    if len(found) == 1:
        return found[0]
    columns = ", ".join(f"{name}: {_kind(feature)}" for name, feature in dataset.features.items())
    count = "no" if not found else f"{len(found)}"
    raise VitflowError(f"{where}: {count} {kind} column{'s' if found else ''} (has {columns}); {fix}")


def _kind(feature: Any) -> str:
    """A column's feature in a word: its dtype for a Value (string, int64), else the feature's type (Image)."""
    import datasets

    if isinstance(feature, datasets.Value):
        return feature.dtype
    return "struct" if isinstance(feature, dict) else type(feature).__name__

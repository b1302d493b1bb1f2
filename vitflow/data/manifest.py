"""List every sample of a data source in a manifest with its label, split, size and checksum.

One row per sample whatever the source (its key: a relative path, or an index where there is no path).
Every image is decoded once here, so unreadable ones are skipped, counted and listed before training.
A missing val or test split is carved from train, per class, by a seeded hash of each sample's key:
the same samples always give the same splits, and the test split does not depend on `val_fraction`.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from vitflow.data.images import inspect_image
from vitflow.data.sources import Source, detect_source
from vitflow.data.sources.base import SPLITS
from vitflow.errors import VitflowError

CARVED = ("test", "val")  # carving order: test first, so the test split does not depend on val_fraction
COLUMNS = ["path", "label", "split", "split_source", "width", "height", "mode", "checksum", "status", "reason"]


def build_manifest(data_path: Path | str, val_fraction: float, test_fraction: float, seed: int,
                   label_names: list[str] | None = None, duplicates: str = "drop_from_eval") -> pd.DataFrame:
    """One row per sample of the source at `data_path` (columns: COLUMNS), every image fully decoded.

    status "ok" rows get split train/val/test (split_source "folder", or "carved" from train);
    "skipped" rows (hidden, non-image, corrupt, misplaced, and val/test copies of training images unless
    `duplicates` is "keep") get split "" and a reason. `duplicates` "error" refuses such copies instead.
    Raises VitflowError for unusable layouts, naming the path and the fix.
    """
    data_path = Path(data_path)
    for name, fraction in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise VitflowError(f"{name}={fraction}: must be at least 0 and below 1")
    source = detect_source(data_path)
    listing = source.list(data_path, label_names)
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # PIL decodes outside the GIL
        inspected = list(pool.map(lambda entry: _inspect(source, data_path, entry), listing.entries))
    rows = pd.DataFrame(
        [(key, label, split, "folder", width, height, mode, checksum, "skipped" if reason or bad else "ok",
          reason or bad)
         for (key, label, split, reason), (checksum, width, height, mode, bad) in zip(listing.entries, inspected,
                                                                                    strict=True)],
        columns=COLUMNS)
    usable = rows[rows["status"] == "ok"]
    if usable.empty:
        raise VitflowError(f"{data_path}: no usable images ({len(rows)} samples); expected {source.description}")
    source.check(data_path, usable, rows)

    fractions = {split: fraction for split, fraction in (("val", val_fraction), ("test", test_fraction))
                 if split not in listing.splits}
    carved = _carve(data_path, usable[usable["split"] == "train"], fractions, seed)
    is_carved = rows["path"].isin(carved.keys())
    rows.loc[is_carved, "split"] = rows.loc[is_carved, "path"].map(carved)
    rows.loc[is_carved, "split_source"] = "carved"
    _apply_duplicate_rule(data_path, rows, duplicates)
    rows.loc[rows["status"] == "skipped", ["split", "split_source"]] = ""
    return rows


def _apply_duplicate_rule(data_path: Path, rows: pd.DataFrame, rule: str) -> None:
    """Val and test images that are exact copies (same checksum) of training images leak the answer into
    evaluation: skip them (`drop_from_eval`), refuse the data (`error`), or leave them (`keep`)."""
    usable = rows["status"] == "ok"
    train_checksums = set(rows.loc[usable & (rows["split"] == "train"), "checksum"])
    leaked = usable & rows["split"].isin(["val", "test"]) & rows["checksum"].isin(train_checksums)
    if not leaked.any() or rule == "keep":
        return
    if rule == "error":
        examples = ", ".join(rows.loc[leaked, "path"].head(3))
        raise VitflowError(f"{data_path}: {int(leaked.sum())} val/test images are exact copies of training images "
                           f"(e.g. {examples}); remove them, or set data.duplicates: drop_from_eval or keep")
    rows.loc[leaked, "status"] = "skipped"
    rows.loc[leaked, "reason"] = "exact copy of a training image, dropped from evaluation (data.duplicates)"


def duplicate_groups(manifest: pd.DataFrame) -> pd.DataFrame:
    """Samples sharing one checksum (exact copies), one row each: checksum, path, split (as listed), status."""
    listed = manifest[manifest["reason"].str.startswith("exact copy") | (manifest["status"] == "ok")]
    repeated = listed[listed.duplicated("checksum", keep=False)]
    return repeated[["checksum", "path", "split", "status"]].sort_values(["checksum", "path"], ignore_index=True)


def similar_labels(labels: list[str]) -> list[list[str]]:
    """Groups of class names that differ only by case or surrounding spaces (likely one class, named twice)."""
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(label.strip().casefold(), []).append(label)
    return [group for group in groups.values() if len(group) > 1]


def _inspect(source: Source, data_path: Path, entry: tuple[str, str, str, str]) -> tuple[str, int, int, str, str]:
    """(md5, width, height, mode, reason) of one sample; decoded only when listing did not already skip it."""
    key, _, _, reason = entry
    return inspect_image(source.open(data_path, key), decode=not reason)


def _carve(data_path: Path, train: pd.DataFrame, fractions: dict[str, float], seed: int) -> dict[str, str]:
    """{key: carved split} for the missing splits, per class, ranked by md5(seed, key)."""
    carved = {}
    for label, keys in train.groupby("label")["path"]:
        ranked = sorted(keys, key=lambda key: hashlib.md5(f"{seed}/{key}".encode()).hexdigest())
        start, taken = 0, {}
        for split in CARVED:
            fraction = fractions.get(split, 0.0)
            count = max(1, int(len(ranked) * fraction + 0.5)) if fraction > 0 else 0
            taken[split] = count
            carved.update(dict.fromkeys(ranked[start:start + count], split))
            start += count
        if start >= len(ranked):
            raise VitflowError(f"{data_path}: class {label!r} has {len(ranked)} usable training images, which leave "
                               f"none for training after carving test ({taken['test']}) and val ({taken['val']}); "
                               "lower data.val_fraction / data.test_fraction or add images")
    return carved


def summarise_manifest(manifest: pd.DataFrame, min_per_class: int = 1) -> dict:
    """{"images": usable count, "skipped": count, "classes": [...], "splits": {split: {class: count}},
    "duplicates": samples that have an exact copy, "dropped_copies": val/test copies of training images
    skipped, "warnings": [small classes (under `min_per_class` in a split), similar class names]}."""
    usable = manifest[manifest["status"] == "ok"]
    counts = usable.groupby(["split", "label"]).size()
    splits = {split: {label: int(n) for label, n in counts[split].items()}
              for split in SPLITS if split in counts.index.get_level_values(0)}
    classes = sorted(usable["label"].unique().tolist())
    warnings = [f"class {label!r} has {splits.get(split, {}).get(label, 0)} images in {split} "
                f"(data.min_per_class={min_per_class})"
                for split in splits for label in classes if splits[split].get(label, 0) < min_per_class]
    warnings += [f"class names {group} differ only by case or spaces; one class named twice?"
                 for group in similar_labels(classes)]
    return {
        "images": len(usable),
        "skipped": int((manifest["status"] != "ok").sum()),
        "classes": classes,
        "splits": splits,
        "duplicates": len(duplicate_groups(manifest)),
        "dropped_copies": int(manifest["reason"].str.startswith("exact copy").sum()),
        "warnings": warnings,
    }


def class_labels(manifest: pd.DataFrame) -> list[str]:
    """The classes of a manifest's readable images, sorted: label index i is the i-th name."""
    return sorted(manifest.loc[manifest["status"] == "ok", "label"].unique().tolist())


def write_manifest(manifest: pd.DataFrame, out_csv: Path | str) -> Path:
    """Save `manifest` as CSV, written to a temporary name and renamed, so a crash leaves no half file."""
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    partial = out_csv.with_name(f".{out_csv.name}.partial")
    manifest.to_csv(partial, index=False)
    partial.replace(out_csv)
    return out_csv

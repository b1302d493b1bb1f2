"""Version the image folder with DVC and list every file in a manifest with its label and split.

Plain functions first (`restore_data`, `version_data`, `build_manifest`, `summarise_manifest`),
thin Prefect tasks at the bottom.

Layouts: `<data_dir>/<split>/<class>/<file>` (split folders among train/val/test; train required)
or `<data_dir>/<class>/<file>` (everything is train). A missing val or test split is carved from
train, per class, by a seeded hash of each file's path: the same files always give the same splits,
whatever the file system's order, and the test split does not depend on `val_fraction`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from PIL import Image
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.context import FlowRunContext, TaskRunContext

from vitflow import PROJECT_ROOT
from vitflow.errors import VitflowError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})
SPLITS = ("train", "val", "test")
CARVED = ("test", "val")  # carving order: test first, so the test split does not depend on val_fraction
COLUMNS = ["path", "label", "split", "split_source", "width", "height", "mode", "checksum", "status", "reason"]


@dataclass(frozen=True)
class DataVersion:
    """Which data a run saw.

    hash: DVC's directory md5 ("<md5>.dir") when tracked, else "content-<md5>" of (path, file md5) pairs.
    tracked: tracked by DVC in this repo. dirty: this version is not committed in git (the .dvc file
    is new or changed, or files under the data path are uncommitted; always true when untracked).
    path: relative to the repo when tracked, else absolute.
    """

    hash: str
    tracked: bool
    dirty: bool
    path: str

    @property
    def short(self) -> str:
        return short_hash(self.hash)


def short_hash(data_version: str | None) -> str:
    """The 8-character form of a data version ("content-<md5>" or "<md5>.dir"), "" when missing."""
    return (data_version or "").removeprefix("content-")[:8]


# ---------------------------------------------------------------- versioning


def run_dvc(repo_root: Path, *args: str) -> str:
    """Run `dvc <args>` in `repo_root`; returns stdout, raises VitflowError with dvc's error line."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo_root, capture_output=True, text=True,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or [f"exit code {result.returncode}"]
        raise VitflowError(f"`dvc {' '.join(args)}` in {repo_root} failed: {errors[-1]}")
    return result.stdout


def _git_dirty(repo_root: Path, paths: Iterable[str]) -> bool:
    """True unless every path is committed and unchanged in git (a new or staged file counts as dirty)."""
    try:
        result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *paths],
                                cwd=repo_root, capture_output=True, text=True)
    except FileNotFoundError:  # no git at all
        return True
    return result.returncode != 0 or bool(result.stdout.strip())


def _inside(path: Path, root: Path) -> bool:
    return path != root and path.is_relative_to(root)


def _files(folder: Path) -> list[Path]:
    """Every file under `folder`, sorted by relative posix path (never the file system's order)."""
    return sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())


def _md5(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def content_hash(data_dir: Path | str) -> str:
    """"content-<md5>" over the sorted (relative posix path, file md5) pairs of every file under `data_dir`."""
    data_dir = Path(data_dir)
    digest = hashlib.md5()
    for path in _files(data_dir):
        digest.update(f"{path.relative_to(data_dir).as_posix()}\0{_md5(path)}\n".encode())
    return f"content-{digest.hexdigest()}"


def restore_data(data_dir: Path | str, repo_root: Path | str = PROJECT_ROOT) -> bool:
    """Fill a missing or file-less `data_dir` from DVC when `<data_dir>.dvc` exists in the repo.

    Tries `dvc checkout` (local cache) first, then `dvc pull` (remote). Returns whether it restored.
    """
    data_dir, repo_root = Path(data_dir).resolve(), Path(repo_root).resolve()
    dvc_file = data_dir.with_name(f"{data_dir.name}.dvc")
    has_files = data_dir.is_dir() and any(path.is_file() for path in data_dir.rglob("*"))
    if has_files or not dvc_file.is_file() or not _inside(data_dir, repo_root):
        return False
    target = dvc_file.relative_to(repo_root).as_posix()
    try:
        run_dvc(repo_root, "checkout", target)
    except VitflowError:
        try:
            run_dvc(repo_root, "pull", target)
        except VitflowError as error:
            raise VitflowError(f"{data_dir}: missing and not restorable from DVC ({error}); check the DVC remote "
                               "(`dvc remote list`) or put the images there yourself") from None
    return True


def version_data(data_dir: Path | str, repo_root: Path | str = PROJECT_ROOT) -> DataVersion:
    """The DataVersion of `data_dir`.

    Inside a DVC repo: `dvc add` it when untracked or changed (skipped when unchanged), hash from the .dvc file.
    Elsewhere: a content hash; nothing is written anywhere. The user's files are never modified.
    """
    data_dir, repo_root = Path(data_dir).resolve(), Path(repo_root).resolve()
    if not data_dir.is_dir():
        raise VitflowError(f"{data_dir}: data folder not found; set data.path or pass --data")
    if not (_inside(data_dir, repo_root) and (repo_root / ".dvc").is_dir()):
        return DataVersion(hash=content_hash(data_dir), tracked=False, dirty=True, path=str(data_dir))
    rel = data_dir.relative_to(repo_root).as_posix()
    dvc_file = repo_root / f"{rel}.dvc"
    if not dvc_file.is_file() or json.loads(run_dvc(repo_root, "status", "--json", f"{rel}.dvc") or "{}"):
        run_dvc(repo_root, "add", rel)
    outs = yaml.safe_load(dvc_file.read_text())["outs"]
    return DataVersion(hash=outs[0]["md5"], tracked=True, dirty=_git_dirty(repo_root, [f"{rel}.dvc", rel]), path=rel)


# ---------------------------------------------------------------- manifest


def _inspect(path: Path, decode: bool) -> tuple[str, int, int, str, str]:
    """(md5, width, height, mode, reason) of one file; fully decodes it when `decode` ("" reason: usable)."""
    data = path.read_bytes()
    checksum = hashlib.md5(data).hexdigest()
    if not decode:
        return checksum, 0, 0, "", ""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return checksum, image.width, image.height, image.mode, ""
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return checksum, 0, 0, "", " ".join(f"unreadable image: {type(error).__name__}: {error}".split())


def _locate(parts: tuple[str, ...], split_dirs: set[str]) -> tuple[str, str, str]:
    """(split, label, reason) a relative path's folders give it; a reason means skip."""
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
        return split, label, f"not an image file (suffix {Path(parts[-1]).suffix or 'none'!r})"
    return split, label, ""


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_classes(data_dir: Path, split_dirs: set[str], usable: pd.DataFrame, rows: pd.DataFrame) -> None:
    """Raises when a class folder has no usable image, there is one class or split classes differ."""
    class_dirs = {split: _subdirs(data_dir / split) for split in sorted(split_dirs)} or {"train": _subdirs(data_dir)}
    for split, classes in class_dirs.items():
        for label in classes:
            folder = data_dir / split / label if split_dirs else data_dir / label
            if not ((usable["split"] == split) & (usable["label"] == label)).any():
                skipped = rows[(rows["split"] == split) & (rows["label"] == label)]
                why = f"{len(skipped)} files skipped, e.g. {skipped['reason'].iloc[0]}" if len(skipped) else "empty"
                raise VitflowError(f"{folder}: class folder has no usable images ({why}); add images or remove it")
    train_classes = class_dirs["train"]
    if len(train_classes) < 2:
        where = data_dir / "train" if split_dirs else data_dir
        raise VitflowError(f"{where}: found {len(train_classes)} class folder(s) {train_classes}; "
                           "need at least two, one folder per class")
    for split, classes in class_dirs.items():
        if classes != train_classes:
            raise VitflowError(f"{data_dir / split}: classes {classes} differ from {data_dir / 'train'} "
                               f"{train_classes}; every split folder needs the same class folders")


def _carve(data_dir: Path, train: pd.DataFrame, fractions: dict[str, float], seed: int,
           split_dirs: set[str]) -> dict[str, str]:
    """{path: carved split} for the missing splits, per class, ranked by md5(seed, path)."""
    carved = {}
    for label, paths in train.groupby("label")["path"]:
        ranked = sorted(paths, key=lambda path: hashlib.md5(f"{seed}/{path}".encode()).hexdigest())
        start, taken = 0, {}
        for split in CARVED:
            fraction = fractions.get(split, 0.0)
            count = max(1, int(len(ranked) * fraction + 0.5)) if fraction > 0 else 0
            taken[split] = count
            carved.update(dict.fromkeys(ranked[start:start + count], split))
            start += count
        if start >= len(ranked):
            folder = data_dir / "train" / label if split_dirs else data_dir / label
            raise VitflowError(f"{folder}: {len(ranked)} usable images leave none for training after carving "
                               f"test ({taken['test']}) and val ({taken['val']}); lower data.val_fraction / "
                               "data.test_fraction or add images")
    return carved


def build_manifest(data_dir: Path | str, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """One row per file under `data_dir` (columns: COLUMNS), every image fully decoded.

    status "ok" rows get split train/val/test (split_source "folder", or "carved" from train);
    "skipped" rows (hidden, non-image, corrupt, misplaced) get split "" and a reason.
    Raises VitflowError for unusable layouts, naming the path and the fix.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise VitflowError(f"{data_dir}: data folder not found; set data.path or pass --data")
    for name, fraction in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise VitflowError(f"{name}={fraction}: must be at least 0 and below 1")
    split_dirs = {name for name in _subdirs(data_dir) if name in SPLITS}
    if split_dirs and "train" not in split_dirs:
        raise VitflowError(f"{data_dir}: has {', '.join(sorted(split_dirs))}/ but no train/ folder; "
                           "add train/<class>/ or use the <class>/ layout")

    files = _files(data_dir)
    located = [_locate(path.relative_to(data_dir).parts, split_dirs) for path in files]
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # PIL decodes outside the GIL
        inspected = list(pool.map(_inspect, files, [not reason for _, _, reason in located]))
    rows = pd.DataFrame(
        [(path.relative_to(data_dir).as_posix(), label, split, "folder", width, height, mode, checksum,
          "skipped" if reason or bad else "ok", reason or bad)
         for path, (split, label, reason), (checksum, width, height, mode, bad) in zip(files, located, inspected,
                                                                                     strict=True)],
        columns=COLUMNS)
    usable = rows[rows["status"] == "ok"]
    if usable.empty:
        raise VitflowError(f"{data_dir}: no usable images ({len(rows)} files); expected <split>/<class>/<image> "
                           f"or <class>/<image> with suffixes {', '.join(sorted(IMAGE_SUFFIXES))}")
    _check_classes(data_dir, split_dirs, usable, rows)

    fractions = {split: fraction for split, fraction in (("val", val_fraction), ("test", test_fraction))
                 if split not in split_dirs}
    carved = _carve(data_dir, usable[usable["split"] == "train"], fractions, seed, split_dirs)
    is_carved = rows["path"].isin(carved.keys())
    rows.loc[is_carved, "split"] = rows.loc[is_carved, "path"].map(carved)
    rows.loc[is_carved, "split_source"] = "carved"
    rows.loc[rows["status"] == "skipped", ["split", "split_source"]] = ""
    return rows


def summarise_manifest(manifest: pd.DataFrame) -> dict:
    """{"images": usable count, "skipped": count, "classes": [...], "splits": {split: {class: count}}}."""
    usable = manifest[manifest["status"] == "ok"]
    counts = usable.groupby(["split", "label"]).size()
    return {
        "images": len(usable),
        "skipped": int((manifest["status"] != "ok").sum()),
        "classes": sorted(usable["label"].unique().tolist()),
        "splits": {split: {label: int(n) for label, n in counts[split].items()}
                   for split in SPLITS if split in counts.index.get_level_values(0)},
    }


# ---------------------------------------------------------------- Prefect tasks


@task(name="version-data", log_prints=True)
def version_data_task(data_dir: str) -> DataVersion:
    """Restore `data_dir` from DVC if it is missing, then version it (see `version_data`)."""
    if restore_data(data_dir, PROJECT_ROOT):
        print(f"restored {data_dir} from DVC")
    version = version_data(data_dir, PROJECT_ROOT)
    print(f"data version {version.hash} (tracked={version.tracked}, dirty={version.dirty})")
    return version


def class_labels(manifest: pd.DataFrame) -> list[str]:
    """The classes of a manifest's readable images, sorted: label index i is the i-th name."""
    return sorted(manifest.loc[manifest["status"] == "ok", "label"].unique().tolist())


@task(name="build-manifest", log_prints=True)
def build_manifest_task(data_dir: str, val_fraction: float, test_fraction: float, seed: int,
                        out_csv: str) -> pd.DataFrame:
    """`build_manifest`, written to `out_csv` and summarised in a table artifact when run by Prefect."""
    manifest = build_manifest(data_dir, val_fraction, test_fraction, seed)
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(out_csv, index=False)
    summary = summarise_manifest(manifest)
    print(f"manifest {out_csv}: {summary['images']} images, {summary['skipped']} skipped, {summary['splits']}")
    if FlowRunContext.get() or TaskRunContext.get():  # artifacts outside a run are deprecated in Prefect 3
        table = [{"split": split, "class": label, "images": n}
                 for split, counts in summary["splits"].items() for label, n in counts.items()]
        create_table_artifact(table + [{"split": "skipped", "class": "", "images": summary["skipped"]}],
                              key="data-manifest", description=f"{data_dir}: images per split and class")
    return manifest

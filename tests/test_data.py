"""tasks.data: manifest statuses and split rules, layout errors, DVC versioning, and the shipped data/."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from vitflow.data.manifest import (
    build_manifest,
    summarise_manifest,
    write_manifest,
)
from vitflow.data.versioning import DataVersion, restore_data, version_data
from vitflow.errors import VitflowError
from vitflow.paths import PROJECT_ROOT

DVC_ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}


def make_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    """Save a small noise image in `mode`; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), dtype=np.uint16))
    elif mode == "P":
        image = image.quantize(16)
    else:
        image = image.convert(mode)
    image.save(path)
    return path


def make_classes(root: Path, counts: dict[str, int], suffix: str = ".jpg", seed: int = 0) -> None:
    for j, (label, count) in enumerate(counts.items()):
        for i in range(count):
            make_image(root / label / f"{label}_{i:03d}{suffix}", seed=seed + 1000 * j + i)


def split_of(manifest: pd.DataFrame) -> dict[str, str]:
    return dict(zip(manifest["path"], manifest["split"], strict=True))


# ---------------------------------------------------------------- manifest rows


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """train/{cats,dogs} and test/{cats,dogs} with every mode plus files that must be skipped."""
    root = tmp_path / "mixed"
    make_image(root / "train/cats/rgb.jpg", "RGB")
    make_image(root / "train/cats/gray.png", "L")
    make_image(root / "train/cats/palette.gif", "P")
    make_image(root / "train/cats/alpha.png", "RGBA")
    make_image(root / "train/dogs/cmyk.jpg", "CMYK")
    make_image(root / "train/dogs/deep.png", "I;16")
    make_image(root / "train/dogs/with space.JPG", "RGB", seed=1)
    full = make_image(root / "train/dogs/truncated.jpg", "RGB", size=(64, 64), seed=2).read_bytes()
    (root / "train/dogs/truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "train/dogs/fake.jpg").write_text("not an image")
    (root / "train/dogs/notes.txt").write_text("hello")
    (root / "train/dogs/.DS_Store").write_bytes(b"\0\1")
    make_image(root / "test/cats/c.jpg", seed=3)
    make_image(root / "test/dogs/d.jpg", seed=4)
    return root


def test_manifest_decodes_every_file_and_skips_bad_ones(mixed: Path) -> None:
    manifest = build_manifest(mixed, 0.0, 0.0, seed=1).set_index("path")
    assert len(manifest) == 13
    ok = manifest[manifest["status"] == "ok"]
    assert sorted(ok["mode"]) == sorted(["RGB", "L", "P", "RGBA", "CMYK", "I;16", "RGB", "RGB", "RGB"])
    assert ok.loc["train/dogs/with space.JPG", "label"] == "dogs"
    assert tuple(ok.loc["train/cats/alpha.png", ["width", "height"]]) == (40, 30)
    reasons = manifest.loc[manifest["status"] == "skipped", "reason"]
    assert set(reasons.index) == {"train/dogs/truncated.jpg", "train/dogs/fake.jpg", "train/dogs/notes.txt",
                                  "train/dogs/.DS_Store"}
    assert reasons["train/dogs/truncated.jpg"].startswith("unreadable image")
    assert reasons["train/dogs/fake.jpg"].startswith("unreadable image")
    assert reasons["train/dogs/notes.txt"].startswith("not an image file")
    assert reasons["train/dogs/.DS_Store"] == "hidden file"
    assert (manifest.loc[reasons.index, "split"] == "").all()
    assert (ok["reason"] == "").all() and set(ok["split"]) == {"train", "test"}
    assert ok["checksum"].str.fullmatch(r"[0-9a-f]{32}").all()


def test_summary_counts(mixed: Path) -> None:
    summary = summarise_manifest(build_manifest(mixed, 0.0, 0.0, seed=1))
    assert summary == {"images": 9, "skipped": 4, "classes": ["cats", "dogs"],
                       "splits": {"train": {"cats": 4, "dogs": 3}, "test": {"cats": 1, "dogs": 1}},
                       "duplicates": 0, "dropped_copies": 0, "warnings": []}


def test_val_and_test_copies_of_training_images_are_dropped_from_evaluation(tmp_path: Path) -> None:
    root = tmp_path / "leaky"
    make_classes(root / "train", {"a": 4, "b": 4})
    make_classes(root / "test", {"a": 2, "b": 2}, seed=500)
    (root / "test/a/copy.jpg").write_bytes((root / "train/a/a_001.jpg").read_bytes())
    (root / "train/b/twin.jpg").write_bytes((root / "train/b/b_000.jpg").read_bytes())  # within train: listed only

    manifest = build_manifest(root, 0.0, 0.0, seed=0)
    copy = manifest.set_index("path").loc["test/a/copy.jpg"]
    assert copy["status"] == "skipped" and copy["split"] == "" and "exact copy" in copy["reason"]
    summary = summarise_manifest(manifest, min_per_class=3)
    assert summary["dropped_copies"] == 1 and summary["duplicates"] == 4  # two pairs
    assert summary["splits"]["test"] == {"a": 2, "b": 2}
    assert summary["warnings"] == ["class 'a' has 2 images in test (data.min_per_class=3)",
                                   "class 'b' has 2 images in test (data.min_per_class=3)"]

    kept = build_manifest(root, 0.0, 0.0, seed=0, duplicates="keep")
    assert kept.set_index("path").loc["test/a/copy.jpg", "status"] == "ok"
    with pytest.raises(VitflowError, match=r"leaky: 1 val/test images are exact copies of training images "
                                           r"\(e.g. test/a/copy.jpg\)"):
        build_manifest(root, 0.0, 0.0, seed=0, duplicates="error")


def test_class_names_that_differ_only_by_case_or_spaces_are_flagged(tmp_path: Path) -> None:
    make_classes(tmp_path / "cased", {"Ants": 3, "ants ": 3, "bees": 3})
    summary = summarise_manifest(build_manifest(tmp_path / "cased", 0.0, 0.0, seed=0))
    assert summary["warnings"] == [
        "class names ['Ants', 'ants '] differ only by case or spaces; one class named twice?"]


def test_manifest_csv_round_trips_and_leaves_no_partial_file(mixed: Path, tmp_path: Path) -> None:
    out_csv = tmp_path / "out" / "manifest.csv"
    manifest = build_manifest(mixed, 0.0, 0.0, 1)
    write_manifest(manifest, out_csv)
    assert [path.name for path in out_csv.parent.iterdir()] == ["manifest.csv"]
    written = pd.read_csv(out_csv, keep_default_na=False, dtype={"checksum": str})
    pd.testing.assert_frame_equal(written, manifest, check_dtype=False)


# ---------------------------------------------------------------- splits


def test_split_folders_are_kept(tmp_path: Path) -> None:
    for split in ("train", "val", "test"):
        make_classes(tmp_path / split, {"a": 5, "b": 4}, seed=100 * len(split))
    manifest = build_manifest(tmp_path, 0.3, 0.3, seed=0)
    assert (manifest["split_source"] == "folder").all()
    assert (manifest["split"] == manifest["path"].str.split("/").str[0]).all()


def test_carving_is_stratified_and_seeded(tmp_path: Path) -> None:
    make_classes(tmp_path, {"a": 20, "b": 10})  # <class>/ layout: everything starts as train
    manifest = build_manifest(tmp_path, 0.2, 0.1, seed=7)
    counts = manifest.groupby(["split", "label"]).size().to_dict()
    assert counts == {("train", "a"): 14, ("val", "a"): 4, ("test", "a"): 2,
                      ("train", "b"): 7, ("val", "b"): 2, ("test", "b"): 1}
    assert set(manifest.loc[manifest["split"] != "train", "split_source"]) == {"carved"}
    assert set(manifest.loc[manifest["split"] == "train", "split_source"]) == {"folder"}
    assert manifest["path"].is_unique and manifest.groupby("checksum")["split"].nunique().max() == 1
    assert split_of(build_manifest(tmp_path, 0.2, 0.1, seed=7)) == split_of(manifest)
    assert split_of(build_manifest(tmp_path, 0.2, 0.1, seed=8)) != split_of(manifest)
    test_only = build_manifest(tmp_path, 0.4, 0.1, seed=7)  # val_fraction does not move the test split
    assert set(test_only.loc[test_only["split"] == "test", "path"]) == set(manifest.loc[manifest["split"] == "test",
                                                                                          "path"])


def test_carving_ignores_file_creation_order(tmp_path: Path) -> None:
    names = [f"img_{i:02d}.png" for i in range(12)]
    for root, order in ((tmp_path / "one", names), (tmp_path / "two", names[::-1])):
        for name in order:
            for label in ("x", "y"):
                make_image(root / "train" / label / name, seed=int(name[4:6]) + 100 * (label == "y"))
    one, two = (build_manifest(tmp_path / name, 0.25, 0.25, seed=3) for name in ("one", "two"))
    assert split_of(one) == split_of(two)
    assert set(one["split"]) == {"train", "val", "test"}


def test_missing_test_split_is_carved_and_val_folder_kept(tmp_path: Path) -> None:
    make_classes(tmp_path / "train", {"a": 10, "b": 10})
    make_classes(tmp_path / "val", {"a": 2, "b": 2}, seed=500)
    manifest = build_manifest(tmp_path, 0.5, 0.2, seed=0)
    val = manifest[manifest["split"] == "val"]
    assert len(val) == 4 and (val["split_source"] == "folder").all()
    test = manifest[manifest["split"] == "test"]
    assert len(test) == 4 and test["path"].str.startswith("train/").all() and (test["split_source"] == "carved").all()


# ---------------------------------------------------------------- errors


def _error_layouts(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (the path the message must name, what it must say); builds each layout under root/<name>."""
    (root / "empty").mkdir()
    (root / "only_text/a").mkdir(parents=True)
    (root / "only_text/a/readme.txt").write_text("x")
    make_classes(root / "no_usable/train", {"a": 3})
    (root / "no_usable/train/b").mkdir(parents=True)
    (root / "no_usable/train/b/broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    make_classes(root / "no_usable/test", {"a": 1, "b": 1}, seed=500)
    make_classes(root / "single", {"a": 4})
    make_classes(root / "differ/train", {"a": 3, "b": 3})
    make_classes(root / "differ/test", {"a": 1, "c": 1}, seed=500)
    make_classes(root / "no_train/val", {"a": 2, "b": 2})
    make_classes(root / "tiny", {"a": 10, "b": 2})
    return {
        "missing": (root / "missing", "not found"),
        "empty": (root / "empty", "no usable images"),
        "only_text": (root / "only_text", "no usable images"),
        "no_usable": (root / "no_usable/train/b", "no usable images"),
        "single": (root / "single", "at least two"),
        "differ": (root / "differ/test", "same class folders"),
        "no_train": (root / "no_train", "no train/"),
        "tiny": (root / "tiny", "class 'b' has 2 usable training images"),
    }


def test_layout_errors_name_the_path(tmp_path: Path) -> None:
    for name, (path, says) in _error_layouts(tmp_path).items():
        with pytest.raises(VitflowError) as caught:
            build_manifest(tmp_path / name, 0.3, 0.3, seed=0)
        message = str(caught.value)
        assert str(path) in message and says in message and "\n" not in message, (name, message)


@pytest.mark.parametrize(("val", "test"), [(1.0, 0.1), (0.1, -0.1)])
def test_bad_fraction_names_the_setting(tmp_path: Path, val: float, test: float) -> None:
    make_classes(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(VitflowError, match=r"data\.(val|test)_fraction"):
        build_manifest(tmp_path, val, test, seed=0)


# ---------------------------------------------------------------- versioning


def run(cwd: Path, *command: str) -> str:
    return subprocess.run(command, cwd=cwd, env=DVC_ENV, check=True, capture_output=True, text=True).stdout


def git(cwd: Path, *args: str) -> str:
    return run(cwd, "git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_version_data_in_a_dvc_repo(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    run(repo, sys.executable, "-m", "dvc", "init", "-q")
    make_classes(repo / "data", {"a": 3, "b": 3})
    files_before = snapshot(repo / "data")

    first = version_data(repo / "data", repo)
    dvc_md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert first == DataVersion(hash=dvc_md5, tracked=True, dirty=True, path="data")  # .dvc file not committed
    assert first.short == dvc_md5[:8] and snapshot(repo / "data") == files_before

    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "data")
    def state() -> tuple:
        return snapshot(repo / ".dvc/cache"), snapshot(repo / "data"), (repo / "data.dvc").stat().st_mtime_ns

    before = state()
    again = version_data(repo / "data", repo)
    assert again == DataVersion(hash=dvc_md5, tracked=True, dirty=False, path="data")
    assert state() == before
    assert git(repo, "status", "--porcelain") == ""

    make_image(repo / "data/a/a_000.jpg", seed=99)
    changed = version_data(repo / "data", repo)
    assert changed.hash != dvc_md5 and changed.dirty
    assert changed.hash == yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]

    restored_files = snapshot(repo / "data")
    for path in (repo / "data").rglob("*.jpg"):
        path.unlink()
    assert restore_data(repo / "data", repo) is True  # from the DVC cache
    assert {k: v[0] for k, v in snapshot(repo / "data").items()} == {k: v[0] for k, v in restored_files.items()}
    assert restore_data(repo / "data", repo) is False  # nothing to do


def test_version_data_outside_a_repo_only_reads(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    make_classes(folder, {"a": 2, "b": 2})
    before = snapshot(tmp_path)
    version = version_data(folder, PROJECT_ROOT)
    assert version.hash.startswith("content-") and len(version.short) == 8
    assert not version.tracked and version.dirty and version.path == str(folder)
    assert snapshot(tmp_path) == before  # nothing written, nothing touched
    assert version_data(folder, PROJECT_ROOT) == version
    (folder / "a/a_000.jpg").rename(folder / "a/renamed.jpg")
    assert version_data(folder, PROJECT_ROOT).hash != version.hash


def test_version_data_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(VitflowError, match=str(tmp_path / "nope")):
        version_data(tmp_path / "nope", tmp_path)


# ---------------------------------------------------------------- the shipped data


def test_shipped_data(tmp_path: Path) -> None:
    """data.dvc in git names exactly the shipped images, which the DVC remote in the repo holds."""
    from dvc.api import DVCFileSystem

    data_dir = tmp_path / "data"
    DVCFileSystem(str(PROJECT_ROOT)).get("data", str(data_dir), recursive=True)  # from the cache, else the remote
    manifest = build_manifest(data_dir, 0.15, 0.15, seed=42)
    assert (manifest["status"] == "ok").all()
    assert sorted(manifest["label"].unique()) == ["ants", "bees"]
    assert manifest.groupby(["split", "split_source"]).size().to_dict() == {
        ("test", "folder"): 153, ("train", "folder"): 208, ("val", "carved"): 37}
    gif = manifest.set_index("path").loc["train/ants/imageNotFound.gif"]
    assert gif["mode"] == "P" and gif["status"] == "ok" and gif["split"] in ("train", "val")
    with Image.open(data_dir / "train/ants/imageNotFound.gif") as image:
        rgb = image.convert("RGB")
    assert rgb.size == (300, 300) and len(rgb.getcolors(1 << 16)) > 1


def test_shipped_xray_example(tmp_path: Path) -> None:
    """examples/pneumoniamnist.npz.dvc names the shipped X-rays, which the DVC remote in the repo holds; the
    sidecar JSON names their classes."""
    from dvc.api import DVCFileSystem

    npz = tmp_path / "pneumoniamnist.npz"
    DVCFileSystem(str(PROJECT_ROOT)).get("examples/pneumoniamnist.npz", str(npz))
    (tmp_path / "pneumoniamnist.json").write_bytes((PROJECT_ROOT / "examples/pneumoniamnist.json").read_bytes())
    manifest = build_manifest(npz, 0.15, 0.15, seed=42)
    usable = manifest[manifest["status"] == "ok"]
    assert usable.groupby(["split", "label"]).size().to_dict() == {
        ("test", "normal"): 234, ("test", "pneumonia"): 234, ("train", "normal"): 1214,
        ("train", "pneumonia"): 1214, ("val", "normal"): 135, ("val", "pneumonia"): 132}
    # the published subsample has three val X-rays that are exact copies of training ones: dropped, and listed
    assert manifest.loc[manifest["status"] != "ok", "path"].tolist() == ["val/39", "val/117", "val/120"]


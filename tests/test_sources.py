"""Data sources: what `data.path` points at decides how samples are listed and read."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PNEUMONIA_NPZ, pneumonia_npz
from PIL import Image

from vitflow.data.cache import load_split, preprocess_dataset
from vitflow.data.manifest import build_manifest, class_labels, summarise_manifest
from vitflow.data.sources import detect_source, versioned_path
from vitflow.data.versioning import content_hash, restore_data, short_hash, version_data
from vitflow.errors import VitflowError
from vitflow.models import DataConfig

CONFIG = DataConfig(image_size=16, resize_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
NAMES = ["normal", "pneumonia"]


def cached_split(manifest: pd.DataFrame, data_path: Path, labels: list[str], cache: Path, split: str):
    """One split of the preprocessing cache built at 28x28 (the images' own size): images, labels, keys."""
    built = preprocess_dataset(manifest, data_path, DataConfig(28, 28, (0.5,) * 3, (0.5,) * 3), labels, cache,
                               progress=False)
    return load_split(built, split)


def xrays(split: str, per_class: int) -> tuple[np.ndarray, list[int]]:
    """The first `per_class` images of each class of a PneumoniaMNIST split (uint8 [N, 28, 28]), their classes."""
    arrays = np.load(PNEUMONIA_NPZ)
    labels = arrays[f"{split}_labels"][:, 0]
    chosen = np.sort(np.concatenate([np.flatnonzero(labels == label)[:per_class] for label in (0, 1)]))
    return arrays[f"{split}_images"][chosen], labels[chosen].tolist()


def png(pixels: np.ndarray) -> bytes:
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="png")
    return encoded.getvalue()


def write_table(table_file: Path, per_class: dict[str, int], split_column: bool = True) -> Path:
    """X-rays as PNGs beside `table_file` (images/<split>/<i>.png) and the table (.csv or .parquet) listing them."""
    rows = []
    for split, count in per_class.items():
        images, labels = xrays(split, count)
        for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            relative = f"images/{split}/{index}.png"
            (table_file.parent / relative).parent.mkdir(parents=True, exist_ok=True)
            (table_file.parent / relative).write_bytes(png(pixels))
            rows.append({"path": relative, "label": NAMES[label], **({"split": split} if split_column else {})})
    save_table(pd.DataFrame(rows), table_file)
    return table_file


def save_table(table: pd.DataFrame, table_file: Path) -> None:
    if table_file.suffix == ".csv":
        table.to_csv(table_file, index=False)
    else:
        table.to_parquet(table_file, index=False)


def hf_splits(per_class: dict[str, int]):
    """{split: datasets.Dataset} of X-rays as PNG bytes in an Image column and a ClassLabel `label` column."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    splits = {}
    for split, count in per_class.items():
        images, labels = xrays("val" if split == "validation" else split, count)
        splits[split] = datasets.Dataset.from_dict(
            {"image": [{"bytes": png(pixels), "path": None} for pixels in images], "label": labels}, features=features)
    return splits


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_an_npz_is_listed_one_row_per_sample_and_missing_splits_are_carved(tmp_path):
    path = pneumonia_npz(tmp_path / "xray.npz", {"train": 30, "val": 5})
    assert detect_source(path).name == "npz" and detect_source(tmp_path).name == "folder"

    manifest = build_manifest(path, 0.1, 0.2, seed=0, label_names=["normal", "pneumonia"])

    assert len(manifest) == 70 and (manifest["status"] == "ok").all()
    assert class_labels(manifest) == ["normal", "pneumonia"]
    assert set(manifest.loc[manifest["split_source"] == "folder", "split"]) == {"train", "val"}
    assert set(manifest.loc[manifest["split_source"] == "carved", "split"]) == {"test"}  # val came with the file
    assert manifest["path"].str.fullmatch(r"(train|val)/\d+").all()
    assert (manifest[["width", "height", "mode"]].drop_duplicates().values.tolist() == [[28, 28, "L"]])


def test_npz_images_reach_the_cache_as_the_arrays_hold_them(tmp_path):
    path = pneumonia_npz(tmp_path / "xray.npz", {"train": 10, "test": 5})
    (tmp_path / "xray.json").write_text(json.dumps({"label_names": ["normal", "pneumonia"]}))
    manifest = build_manifest(path, 0.2, 0.0, seed=0)
    labels = class_labels(manifest)
    assert labels == ["normal", "pneumonia"]  # from the sidecar JSON

    test = cached_split(manifest, path, labels, tmp_path / "cache", "test")
    arrays = np.load(path)
    expected = torch.from_numpy(arrays["test_images"][[int(key.split("/")[1]) for key in test.paths]])
    assert torch.equal(test.images[:, 0], expected) and torch.equal(test.images[:, 1], expected)  # grey -> RGB
    assert test.labels.tolist() == [int(arrays["test_labels"][int(key.split("/")[1]), 0]) for key in test.paths]


@pytest.mark.parametrize("arrays, says", [
    ({"images": np.zeros((4, 8, 8), np.uint8)}, "no 'train_images' array (has images)"),
    ({"train_images": np.zeros((4, 8, 8), np.uint8)}, "has train_images but no train_labels"),
    ({"train_images": np.zeros((4, 8, 8), np.uint8), "train_labels": np.zeros(3, np.int64)},
     "train_labels is int64 [3] for 4 images"),
    ({"train_images": np.zeros((4, 8, 8), np.float32), "train_labels": np.zeros(4, np.int64)},
     "train_images is float32 [4, 8, 8]; expected uint8"),
    ({"train_images": np.zeros((4, 8, 8), np.uint8), "train_labels": np.array([0, 1, 2, 1]),
      "label_names": np.array(["a", "b"])}, "label_names names 2 classes but the labels go up to 2"),
])
def test_a_bad_npz_is_one_line_naming_the_file_and_the_key(tmp_path, arrays, says):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    before = path.read_bytes()
    with pytest.raises(VitflowError, match=rf"bad.npz: .*{re.escape(says)}") as error:
        build_manifest(path, 0.2, 0.2, seed=0)
    assert "\n" not in str(error.value) and path.read_bytes() == before  # nothing the user had is changed


def test_a_file_no_source_reads_is_refused_naming_the_formats(tmp_path):
    (tmp_path / "data.txt").write_text("path,label\n")
    with pytest.raises(VitflowError, match=r"data.txt: not a data source vitflow reads; pass one of: "
                                           r"a Hugging Face dataset .*; an image folder .*; a \.csv or \.parquet"):
        detect_source(tmp_path / "data.txt")


# ---------------------------------------------------------------- a table of image paths (.csv or .parquet)


@pytest.mark.parametrize("name", ["labels.csv", "labels.parquet"])
def test_a_table_is_listed_one_row_per_sample_and_missing_splits_are_carved(tmp_path, name):
    table_file = write_table(tmp_path / "xrays" / name, {"train": 12, "test": 4})
    assert detect_source(table_file).name == "table" and versioned_path(table_file) == tmp_path / "xrays"

    manifest = build_manifest(table_file, 0.25, 0.2, seed=0)

    assert len(manifest) == 32 and (manifest["status"] == "ok").all()
    assert class_labels(manifest) == NAMES
    assert manifest["path"].str.fullmatch(r"images/(train|test)/\d+\.png").all()
    from_table = manifest[manifest["split_source"] == "folder"]
    assert from_table.groupby("split").size().to_dict() == {"train": 18, "test": 8}
    assert manifest.loc[manifest["split_source"] == "carved", "split"].tolist() == ["val"] * 6  # 3 per class
    assert (from_table["split"] == from_table["path"].str.split("/").str[1]).all()  # the column's split kept


def test_a_table_without_a_split_column_is_all_train_with_val_and_test_carved(tmp_path):
    table_file = write_table(tmp_path / "labels.csv", {"train": 10}, split_column=False)
    manifest = build_manifest(table_file, 0.2, 0.2, seed=0)
    assert len(manifest) == 20 and manifest.groupby(["split", "split_source"]).size().to_dict() == {
        ("test", "carved"): 4, ("train", "folder"): 12, ("val", "carved"): 4}


def test_table_images_reach_the_cache_as_the_files_hold_them(tmp_path):
    table_file = write_table(tmp_path / "data" / "labels.csv", {"train": 6, "test": 5})
    table = pd.read_csv(table_file)
    table.loc[0, "path"] = str(table_file.parent / table.loc[0, "path"])  # absolute, inside the folder: allowed
    table.to_csv(table_file, index=False)
    manifest = build_manifest(table_file, 0.2, 0.0, seed=0)

    test = cached_split(manifest, table_file, class_labels(manifest), tmp_path / "cache", "test")

    images, labels = xrays("test", 5)
    order = [int(key.removeprefix("images/test/").removesuffix(".png")) for key in test.paths]
    assert torch.equal(test.images[:, 0], torch.from_numpy(images[order]))
    assert test.labels.tolist() == [labels[index] for index in order]
    train = cached_split(manifest, table_file, class_labels(manifest), tmp_path / "cache", "train")
    assert "images/train/0.png" in train.paths  # the absolute path, keyed relative to the table's folder


def test_table_rows_whose_file_is_missing_are_skipped_and_counted_not_fatal(tmp_path):
    table_file = write_table(tmp_path / "labels.csv", {"train": 6, "val": 2})
    table = pd.read_csv(table_file)
    extra = pd.DataFrame([{"path": "images/gone.png", "label": "normal", "split": "train"},
                          {"path": "images/train/0.png", "label": "normal", "split": "dev"},
                          {"path": "images/train/1.png", "label": "normal", "split": "train"}])
    pd.concat([table, extra]).to_csv(table_file, index=False)
    before = file_bytes(tmp_path)

    manifest = build_manifest(table_file, 0.0, 0.2, seed=0)

    skipped = manifest[manifest["status"] == "skipped"].set_index("path")["reason"].to_dict()
    assert skipped == {"images/gone.png": "file not found", "images/train/0.png": "path listed again (an earlier "
                       "row has it)", "images/train/1.png": "path listed again (an earlier row has it)"}
    assert len(manifest) == 19 and summarise_manifest(manifest)["skipped"] == 3
    assert file_bytes(tmp_path) == before


def test_a_table_with_a_split_other_than_train_val_test_skips_that_row(tmp_path):
    table_file = write_table(tmp_path / "labels.csv", {"train": 6})
    table = pd.read_csv(table_file)
    table.loc[0, "split"], table.loc[1, "split"] = "holdout", "validation"
    table.to_csv(table_file, index=False)
    manifest = build_manifest(table_file, 0.0, 0.2, seed=0).set_index("path")
    assert manifest.loc["images/train/0.png", "reason"] == "split 'holdout' is not train, val or test"
    assert manifest.loc["images/train/1.png", ["split", "split_source"]].tolist() == ["val", "folder"]


@pytest.mark.parametrize("name, columns, says", [
    ("labels.csv", {"path": "path", "label": "class", "split": "split"},
     "labels.csv: no 'label' column (has path, class, split); name the class column 'label'"),
    ("labels.csv", {"path": "file", "label": "label"},
     "labels.csv: no 'path' column (has file, label); name the column of image files 'path'"),
    ("labels.parquet", {"path": "file", "label": "label"},
     "labels.parquet: no image column (a struct of bytes/path, as Hugging Face datasets write) and no 'path' "
     "column (has file, label)"),
])
def test_a_table_without_its_columns_is_one_line_naming_the_file_and_the_columns(tmp_path, name, columns, says):
    table_file = write_table(tmp_path / name, {"train": 2})
    table = pd.read_csv(table_file) if name.endswith(".csv") else pd.read_parquet(table_file)
    save_table(table[list(columns)].rename(columns=columns), table_file)
    before = file_bytes(tmp_path)
    with pytest.raises(VitflowError, match=re.escape(says)) as error:
        build_manifest(table_file, 0.2, 0.2, seed=0)
    assert "\n" not in str(error.value) and file_bytes(tmp_path) == before


@pytest.mark.parametrize("path", ["../outside.png", "images/../../outside.png", "/elsewhere/outside.png"])
def test_a_table_path_leaving_its_folder_is_refused_naming_the_file_and_the_path(tmp_path, path):
    (tmp_path / "outside.png").write_bytes(png(np.zeros((4, 4), np.uint8)))
    table_file = write_table(tmp_path / "data" / "labels.csv", {"train": 2})
    table = pd.read_csv(table_file)
    table.loc[0, "path"] = path
    table.to_csv(table_file, index=False)
    before = file_bytes(tmp_path)
    with pytest.raises(VitflowError, match=rf"labels.csv: column 'path' has {re.escape(repr(path))}, outside "
                                           rf".*data \(the folder DVC versions with the table\)") as error:
        build_manifest(table_file, 0.2, 0.2, seed=0)
    assert "\n" not in str(error.value) and file_bytes(tmp_path) == before


def test_a_table_is_versioned_and_restored_by_dvc_as_its_folder(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    table_file = write_table(repo / "data" / "labels.csv", {"train": 2})
    files = file_bytes(repo / "data")

    version = version_data(versioned_path(table_file), repo)

    assert version.tracked and version.path == "data" and (repo / "data.dvc").is_file()
    assert file_bytes(repo / "data") == files
    for file in sorted((repo / "data").rglob("*"), reverse=True):  # a fresh clone: the folder is not there
        file.unlink() if file.is_file() else file.rmdir()
    (repo / "data").rmdir()
    assert versioned_path(table_file) == repo / "data"
    assert restore_data(versioned_path(table_file), repo) and file_bytes(repo / "data") == files


# ---------------------------------------------------------------- a Hugging Face dataset


def test_a_saved_dataset_dict_is_listed_one_row_per_sample_with_its_splits(tmp_path):
    import datasets

    splits = hf_splits({"train": 8, "validation": 3})
    unlabelled = datasets.Dataset.from_dict({"image": splits["validation"]["image"][:2], "label": [-1, -1]},
                                            features=splits["train"].features)
    path = tmp_path / "xrays"
    datasets.DatasetDict({**splits, "unsupervised": unlabelled, "test": unlabelled}).save_to_disk(path)
    before = file_bytes(path)
    assert detect_source(path).name == "hf_datasets" and versioned_path(path) == path

    manifest = build_manifest(path, 0.2, 0.2, seed=0)

    assert len(manifest) == 26 and class_labels(manifest) == NAMES
    ok = manifest[manifest["status"] == "ok"]
    assert ok.groupby(["split", "split_source"]).size().to_dict() == {
        ("test", "carved"): 4, ("train", "folder"): 12, ("val", "folder"): 6}  # test has no labelled rows: carved
    assert set(ok.loc[ok["split_source"] == "folder", "path"].str.split("/").str[0]) == {"train", "validation"}
    skipped = manifest[manifest["status"] == "skipped"].set_index("path")["reason"].to_dict()
    assert skipped == {"test/0": "no label (-1)", "test/1": "no label (-1)",
                       "unsupervised/0": "split 'unsupervised' is not train, validation or test",
                       "unsupervised/1": "split 'unsupervised' is not train, validation or test"}
    assert file_bytes(path) == before  # read in place: no cache file beside the data


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_parquet_with_an_image_column_goes_to_the_hugging_face_source(tmp_path, layout):
    splits = hf_splits({"train": 8, "test": 3})
    if layout == "file":
        path = tmp_path / "xrays.parquet"
        splits["train"].to_parquet(path)
    else:
        path = tmp_path / "xrays"
        for split, dataset in splits.items():  # a Hub dataset's Parquet layout
            dataset.to_parquet(path / "data" / f"{split}-00000-of-00001.parquet")
        (path / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n")
    before = file_bytes(tmp_path)
    assert detect_source(path).name == "hf_datasets"

    manifest = build_manifest(path, 0.25, 0.25, seed=0)

    assert (manifest["status"] == "ok").all() and class_labels(manifest) == NAMES
    assert len(manifest) == (16 if layout == "file" else 22)
    carved = manifest[manifest["split_source"] == "carved"].groupby("split").size().to_dict()
    assert carved == ({"test": 4, "val": 4} if layout == "file" else {"val": 4})
    assert file_bytes(tmp_path) == before  # Parquet is converted in vitflow's work folder, not beside the data


def test_hugging_face_images_reach_the_cache_as_the_dataset_holds_them(tmp_path):
    import datasets

    path = tmp_path / "xrays"
    datasets.DatasetDict(hf_splits({"train": 6, "validation": 2, "test": 5})).save_to_disk(path)
    manifest = build_manifest(path, 0.0, 0.0, seed=0)

    test = cached_split(manifest, path, class_labels(manifest), tmp_path / "cache", "test")

    images, labels = xrays("test", 5)
    order = [int(key.removeprefix("test/")) for key in test.paths]
    assert torch.equal(test.images[:, 0], torch.from_numpy(images[order]))
    assert test.labels.tolist() == [labels[index] for index in order]
    assert detect_source(path).open(path, "test/0").name == f"{path}[test/0]"


@pytest.mark.parametrize("change, says", [
    ("string labels", " [train]: no ClassLabel column (has image: Image, label: string); make the class column "
                      "a ClassLabel"),
    ("two image columns", " [train]: 2 image columns (has image: Image, label: ClassLabel, scan: Image); store the "
                          "images in one datasets.Image column"),
    ("no train split", ": no train split (has validation); name the training split 'train'"),
])
def test_a_bad_hugging_face_dataset_is_one_line_naming_the_file_and_the_columns(tmp_path, change, says):
    import datasets

    dataset = hf_splits({"train": 2})["train"]
    if change == "string labels":
        dataset = dataset.cast_column("label", datasets.Value("string"))
    elif change == "two image columns":
        dataset = dataset.add_column("scan", [{"bytes": png(np.zeros((4, 4), np.uint8)), "path": None}] * 4,
                                     feature=datasets.Image())
    else:
        dataset = datasets.DatasetDict({"validation": dataset})
    path = tmp_path / "xrays"
    dataset.save_to_disk(path)
    before = file_bytes(path)
    with pytest.raises(VitflowError, match=rf"xrays{re.escape(says)}") as error:
        build_manifest(path, 0.2, 0.2, seed=0)
    assert "\n" not in str(error.value) and file_bytes(path) == before


# ---------------------------------------------------------------- through the flow


@pytest.fixture
def run_flow(tiny_hf_model, tmp_path):
    """Run the `retrain` flow on `data_path` (one strategy, tiny ViT); returns its summary, the manifest the
    run logged to MLflow and the registered version's class labels."""
    from mlflow.tracking import MlflowClient

    from flows.retrain import retrain
    from vitflow.tracking import tracking_uri

    def run(data_path: Path, name: str) -> tuple[dict, pd.DataFrame, list[str]]:
        summary = retrain(overrides=[f"data.path={data_path}", f"model.source={tiny_hf_model}",
                                     "train.strategies=[feature_extraction]", "train.feature_extraction.epochs=2",
                                     "export.precisions=[]", f"registry.model_name={name}",
                                     f"mlflow.experiment={name}"])
        client = MlflowClient(tracking_uri(), tracking_uri())
        [registered] = summary["registered"]
        logged = client.download_artifacts(registered.run_id, f"{short_hash(summary['data_version'])}.csv",
                                           str(tmp_path / "artifacts"))
        labels = json.loads(client.get_model_version(name, registered.version).tags["labels"])
        return summary, pd.read_csv(logged), labels

    return run


def test_a_table_runs_through_the_flow_versioned_as_its_folder(run_flow, tmp_path):
    table_file = write_table(tmp_path / "xrays" / "labels.csv", {"train": 20, "test": 6})
    with table_file.open("a") as table:
        table.write("images/gone.png,normal,train\n")

    summary, manifest, labels = run_flow(table_file, "table-classifier")

    assert summary["data_version"] == content_hash(tmp_path / "xrays")  # the images too, not the table alone
    assert summary["skipped_images"] == 1 and len(manifest) == 53
    assert manifest.loc[manifest["status"] == "skipped", "reason"].tolist() == ["file not found"]
    assert labels == NAMES


def test_a_hugging_face_dataset_runs_through_the_flow(run_flow, tmp_path):
    import datasets

    path = tmp_path / "xrays-hf"
    datasets.DatasetDict(hf_splits({"train": 20, "validation": 4, "test": 6})).save_to_disk(path)

    summary, manifest, labels = run_flow(path, "hf-classifier")

    assert summary["data_version"] == content_hash(path) and summary["skipped_images"] == 0
    assert len(manifest) == 60 and set(manifest["split"]) == {"train", "val", "test"}
    assert (manifest["split_source"] == "folder").all() and labels == NAMES

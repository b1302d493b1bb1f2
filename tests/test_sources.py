"""Data sources: what `data.path` points at decides how samples are listed and read."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import pneumonia_npz

from vitflow.data.cache import load_split, preprocess_dataset
from vitflow.data.manifest import build_manifest, class_labels
from vitflow.data.sources import detect_source
from vitflow.errors import VitflowError
from vitflow.models import DataConfig

CONFIG = DataConfig(image_size=16, resize_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)


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

    cache = preprocess_dataset(manifest, path, DataConfig(28, 28, (0.5,) * 3, (0.5,) * 3), labels,
                               tmp_path / "cache.safetensors", progress=False)

    test = load_split(cache, "test")
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
    (tmp_path / "data.csv").write_text("path,label\n")
    with pytest.raises(VitflowError, match="data.csv: not a data source vitflow reads; pass one of: an image folder"):
        detect_source(tmp_path / "data.csv")

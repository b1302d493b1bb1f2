import json

import pytest
import torch

from vitflow.errors import VitflowError
from vitflow.models import DataConfig, load_model

LABELS = ["ants", "bees"]


@pytest.mark.parametrize("backend, fixture", [("hf", "tiny_hf_model"), ("timm", "tiny_timm_model"),
                                              ("timm", "tiny_deit_distilled"), ("timm", "tiny_hybrid")])
def test_new_head_fits_labels_and_features_feed_the_head(backend, fixture, request):
    model = load_model(str(request.getfixturevalue(fixture)), labels=LABELS).eval()
    assert model.backend == backend
    assert model.labels == LABELS
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model(pixels)
        assert logits.shape == (3, 2)
        torch.testing.assert_close(model.forward_head(model.forward_features(pixels)), logits)
    assert len(model.blocks) == 2
    assert isinstance(model.final_norm, torch.nn.LayerNorm)


@pytest.mark.parametrize("backend", ["hf", "timm"])
def test_save_and_load_round_trip(backend, tiny_hf_model, tiny_timm_model, tmp_path):
    source = str(tiny_hf_model if backend == "hf" else tiny_timm_model)
    model = load_model(source, labels=LABELS).eval()
    model.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    reloaded = load_model(str(tmp_path / "saved")).eval()
    assert reloaded.labels == LABELS
    assert reloaded.data_config == model.data_config
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels), model(pixels))


def test_hf_checkpoint_loads_with_plain_transformers(tiny_hf_model, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    load_model(str(tiny_hf_model), labels=LABELS).save(tmp_path / "saved")
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "saved")
    assert plain.config.id2label == {0: "ants", 1: "bees"}
    processor = AutoImageProcessor.from_pretrained(tmp_path / "saved")
    assert processor.crop_size["height"] == 32


def test_data_config_comes_from_the_model(tiny_hf_model, tiny_timm_model):
    hf = load_model(str(tiny_hf_model), labels=LABELS)
    assert hf.data_config == DataConfig(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    timm_model = load_model(str(tiny_timm_model), labels=LABELS)
    assert timm_model.data_config.image_size == 32
    assert timm_model.data_config.resize_size == int(32 / 0.9)


def test_image_size_override_runs_at_the_new_size(tiny_hf_model):
    model = load_model(str(tiny_hf_model), labels=LABELS, image_size=48).eval()
    assert model.data_config.image_size == 48
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 2)


def test_a_size_the_patches_do_not_tile_is_one_line(tiny_hybrid):
    with pytest.raises(VitflowError, match="cannot run at 40 px; set preprocess.image_size"):
        load_model(str(tiny_hybrid), labels=LABELS, image_size=40)


def test_sidecar_records_backend_and_labels(tiny_timm_model, tmp_path):
    load_model(str(tiny_timm_model), labels=LABELS).save(tmp_path / "saved")
    sidecar = json.loads((tmp_path / "saved" / "vitflow.json").read_text())
    assert sidecar["backend"] == "timm" and sidecar["labels"] == LABELS


def test_bad_sources_give_one_line_errors(tmp_path):
    with pytest.raises(VitflowError, match="not a model directory"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitflowError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(VitflowError, match="timm model 'vit_tiny_patch16_224': cannot load"):
        load_model("timm:vit_tiny_patch16_224")

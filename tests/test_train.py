import math

import pandas as pd
import pytest
import torch

from tasks.preprocess import load_split, preprocess_dataset
from tasks.train import STRATEGIES, TrainSettings, fine_tune, output_dir, set_trainable, warmup_cosine
from vitflow.errors import VitflowError
from vitflow.models import load_model

LABELS = ["normal", "pneumonia"]
SETTINGS = TrainSettings(epochs=2, batch_size=16, lr_backbone=3e-3, lr_head=3e-3, weight_decay=0.01,
                         warmup_ratio=0.1, partial_blocks=1, feature_extraction_epochs=5, seed=0, augment=True,
                         crop_scale_min=0.6)


@pytest.fixture(scope="module")
def splits(pneumonia_folder, tiny_hf_model, tmp_path_factory):
    rows = [{"path": str(path.relative_to(pneumonia_folder)), "label": path.parent.name, "split": path.parts[-3],
             "checksum": "", "status": "ok"} for path in sorted(pneumonia_folder.rglob("*.png"))]
    config = load_model(str(tiny_hf_model), LABELS).data_config
    cache = preprocess_dataset(pd.DataFrame(rows), pneumonia_folder, config, LABELS,
                               tmp_path_factory.mktemp("cache") / "data.safetensors", progress=False)
    return load_split(cache, "train"), load_split(cache, "val")


def _trainable_names(model):
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_strategies_freeze_what_they_should(tiny_hf_model):
    model = load_model(str(tiny_hf_model), LABELS)
    trainable, total = set_trainable(model, "full", partial_blocks=1)
    assert trainable == total
    head = {f"model.classifier.{name}" for name, _ in model.head.named_parameters()}
    last_block = {f"model.vit.layers.1.{name}" for name, _ in model.blocks[1].named_parameters()}
    final_norm = {f"model.vit.layernorm.{name}" for name, _ in model.final_norm.named_parameters()}
    set_trainable(model, "partial", partial_blocks=1)
    assert _trainable_names(model) == head | last_block | final_norm
    trainable, _ = set_trainable(model, "feature_extraction", partial_blocks=1)
    assert _trainable_names(model) == head
    assert trainable == sum(p.numel() for p in model.head.parameters())


def test_bad_strategy_settings_are_refused(tiny_hf_model):
    model = load_model(str(tiny_hf_model), LABELS)
    with pytest.raises(VitflowError, match="unknown strategy 'linear'"):
        set_trainable(model, "linear", 1)
    with pytest.raises(VitflowError, match="partial_blocks=5"):
        set_trainable(model, "partial", 5)


def test_warmup_then_cosine_decay():
    multiplier = warmup_cosine(total_steps=100, warmup_ratio=0.1)
    assert multiplier(0) == pytest.approx(0.1)
    assert multiplier(9) == pytest.approx(1.0)
    assert multiplier(10) == pytest.approx(1.0)
    assert multiplier(55) == pytest.approx(0.5, abs=1e-6)
    assert multiplier(99) < 0.01
    assert all(multiplier(step) >= multiplier(step + 1) for step in range(10, 99))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fine_tune_changes_only_trainable_weights_and_saves_the_model(strategy, splits, tiny_hf_model, tmp_path):
    train, val = splits
    model = load_model(str(tiny_hf_model), LABELS)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    result = fine_tune(model, train, val, strategy, SETTINGS, tmp_path, progress=False)
    trainable = _trainable_names(model)
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter)
        assert changed == (name in trainable), name
    epochs = SETTINGS.feature_extraction_epochs if strategy == "feature_extraction" else SETTINGS.epochs
    assert [row["epoch"] for row in result.history] == list(range(1, epochs + 1))
    assert all(math.isfinite(row["train_loss"]) and 0 <= row["val_accuracy"] <= 1 for row in result.history)
    assert result.trainable_params < result.total_params or strategy == "full"
    reloaded = load_model(result.model_dir).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels), model.eval()(pixels))


def test_training_is_seeded(splits, tiny_hf_model, tmp_path):
    train, val = splits
    histories = []
    for run in range(2):
        torch.manual_seed(0)  # the new head's initialisation; fine_tune_task seeds it the same way
        model = load_model(str(tiny_hf_model), LABELS)
        histories.append(fine_tune(model, train, val, "partial", SETTINGS, tmp_path / str(run), progress=False).history)
    assert histories[0] == histories[1]


def test_output_dir_follows_data_settings_and_strategy(tmp_path):
    base = output_dir(tmp_path, "cache/abc.safetensors", "model", None, SETTINGS, "full")
    assert base == output_dir(tmp_path, "cache/abc.safetensors", "model", None, SETTINGS, "full")
    assert base.name == "full"
    other_data = output_dir(tmp_path, "cache/def.safetensors", "model", None, SETTINGS, "full")
    other_epochs = output_dir(tmp_path, "cache/abc.safetensors", "model", None,
                              TrainSettings(**{**SETTINGS.__dict__, "epochs": 3}), "full")
    assert len({base.parent, other_data.parent, other_epochs.parent}) == 3

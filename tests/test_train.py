import math

import pandas as pd
import pytest
import torch

from vitflow.config import TrainConfig
from vitflow.data.cache import load_split, preprocess_dataset
from vitflow.errors import VitflowError
from vitflow.identity import training_dir
from vitflow.models import load_model
from vitflow.training.loop import fine_tune, set_trainable
from vitflow.training.strategies import STRATEGIES, check_train_config, resolve

LABELS = ["normal", "pneumonia"]
TRAIN = TrainConfig(strategies=list(STRATEGIES), epochs=2, batch_size=16, lr_backbone=3e-3, lr_head=3e-3,
                    weight_decay=0.01, warmup_ratio=0.1, seed=0, augment=True, crop_scale_min=0.6,
                    partial={"blocks": 1}, feature_extraction={"epochs": 5})


def sections(**per_strategy) -> TrainConfig:
    """TRAIN with these per-strategy sections."""
    return TrainConfig(**{**TRAIN.model_dump(), **per_strategy})


@pytest.fixture(scope="module")
def splits(pneumonia_folder, tiny_hf_model, tmp_path_factory):
    rows = [{"path": str(path.relative_to(pneumonia_folder)), "label": path.parent.name, "split": path.parts[-3],
             "checksum": "", "status": "ok"} for path in sorted(pneumonia_folder.rglob("*.png"))]
    config = load_model(str(tiny_hf_model), LABELS).data_config
    cache = preprocess_dataset(pd.DataFrame(rows), pneumonia_folder, config, LABELS,
                               tmp_path_factory.mktemp("cache") / "data", progress=False)
    return load_split(cache, "train"), load_split(cache, "val")


def _trainable_names(model):
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_strategies_freeze_what_they_should(tiny_hf_model):
    model = load_model(str(tiny_hf_model), LABELS)
    trainable, total = set_trainable(model, resolve(TRAIN, "full"))
    assert trainable == total
    head = {f"model.classifier.{name}" for name, _ in model.head.named_parameters()}
    last_block = {f"model.vit.layers.1.{name}" for name, _ in model.blocks[1].named_parameters()}
    final_norm = {f"model.vit.layernorm.{name}" for name, _ in model.final_norm.named_parameters()}
    set_trainable(model, resolve(TRAIN, "partial"))
    assert _trainable_names(model) == head | last_block | final_norm
    trainable, _ = set_trainable(model, resolve(TRAIN, "feature_extraction"))
    assert _trainable_names(model) == head
    assert trainable == sum(p.numel() for p in model.head.parameters())


def test_bad_strategy_settings_are_refused(tiny_hf_model):
    with pytest.raises(VitflowError, match="unknown strategy 'linear'"):
        resolve(TRAIN, "linear")
    with pytest.raises(VitflowError, match="train.partial.blocks=0 is not allowed"):
        resolve(sections(partial={"blocks": 0}), "partial")
    with pytest.raises(VitflowError, match="unknown setting 'train.partial.block'"):
        resolve(sections(partial={"block": 1}), "partial")
    with pytest.raises(VitflowError, match="train.full.lr_head='fast' is not allowed"):
        resolve(sections(full={"lr_head": "fast"}), "full")
    with pytest.raises(VitflowError, match="unknown setting 'train.fulll'"):
        check_train_config(TrainConfig(**{**TRAIN.model_dump(), "fulll": {}}))
    with pytest.raises(VitflowError, match="partial.blocks=5: must be between 1 and 2"):
        set_trainable(load_model(str(tiny_hf_model), LABELS), resolve(sections(partial={"blocks": 5}), "partial"))


def test_a_strategy_section_overrides_shared_settings_for_that_strategy_alone():
    assert resolve(TRAIN, "feature_extraction").settings.epochs == 5
    assert resolve(TRAIN, "full").settings.epochs == 2
    assert resolve(TRAIN, "partial").options.blocks == 1


@pytest.mark.parametrize("strategy", ["full", "partial", "feature_extraction"])  # lora merges: test_lora.py
def test_fine_tune_changes_only_trainable_weights_and_saves_the_model(strategy, splits, tiny_hf_model, tmp_path):
    train, val = splits
    model = load_model(str(tiny_hf_model), LABELS)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    result = fine_tune(model, train, val, resolve(TRAIN, strategy), tmp_path, progress=False)
    trainable = _trainable_names(model)
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter)
        assert changed == (name in trainable), name
    epochs = 5 if strategy == "feature_extraction" else TRAIN.epochs
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
        histories.append(fine_tune(model, train, val, resolve(TRAIN, "partial"), tmp_path / str(run),
                                   progress=False).history)
    assert histories[0] == histories[1]


def test_training_dir_follows_data_settings_and_strategy(tmp_path):
    full = resolve(TRAIN, "full").as_dict()
    base = training_dir(tmp_path, "cache/abc", "model", None, full)
    assert base == training_dir(tmp_path, "cache/abc", "model", None, full)
    assert base.name == "full"
    other_data = training_dir(tmp_path, "cache/def", "model", None, full)
    other_epochs = training_dir(tmp_path, "cache/abc", "model", None, {**full, "epochs": 3})
    partial_blocks = [training_dir(tmp_path, "cache/abc", "model", None,
                                   resolve(sections(partial={"blocks": blocks}), "partial").as_dict())
                      for blocks in (1, 2)]
    assert len({base.parent, other_data.parent, other_epochs.parent, *(path.parent for path in partial_blocks)}) == 5

"""The `lora` strategy: PEFT adapters on the blocks' linear layers train with the head, and are merged into the
weights before saving, so the checkpoint is the library's own."""

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from vitflow.config import TrainConfig
from vitflow.data.cache import SplitTensors
from vitflow.errors import VitflowError
from vitflow.models import load_model
from vitflow.training.loop import fine_tune, set_trainable
from vitflow.training.strategies import resolve

LABELS = ["normal", "pneumonia"]
RANK = 4
TRAIN = TrainConfig(strategies=["lora"], seed=0, epochs=1, batch_size=4, lr_backbone=1e-2, lr_head=1e-2,
                    weight_decay=0.0, warmup_ratio=0.0, crop_scale_min=0.6, lora={"rank": RANK, "alpha": 8})
MODELS = ["tiny_hf_model", "tiny_timm_model", "tiny_dinov2"]


def lora(**options) -> TrainConfig:
    return TrainConfig(**{**TRAIN.model_dump(), "lora": options})


def block_linears(model) -> dict[str, nn.Linear]:
    """The linear layers inside the transformer blocks, by their parameter-name prefix in `model`."""
    inside = {id(module) for module in model.blocks.modules()}
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)
            and id(module) in inside}


def saved_keys(directory: Path) -> set[str]:
    keys = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            keys |= set(handle.keys())
    return keys


@pytest.fixture(params=MODELS)
def source(request) -> str:
    return str(request.getfixturevalue(request.param))


def test_only_the_adapters_and_the_head_train(source):
    model = load_model(source, LABELS)
    resolved = resolve(TRAIN, "lora")
    dims = {name: (linear.in_features, linear.out_features) for name, linear in block_linears(model).items()}
    resolved.strategy.prepare(model, resolved.options)
    trainable, _ = set_trainable(model, resolved)

    assert isinstance(model.head, nn.Linear)  # never adapted
    head = {id(parameter) for parameter in model.head.parameters()}
    trains = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    adapters = {f"{layer}.lora_{factor}.default.weight" for layer in dims for factor in "AB"}
    assert trains == adapters | {name for name, parameter in model.named_parameters() if id(parameter) in head}
    head_size = sum(parameter.numel() for parameter in model.head.parameters())
    assert trainable == head_size + sum(RANK * (fan_in + fan_out) for fan_in, fan_out in dims.values())


def test_training_changes_adapters_and_head_then_merging_gives_the_same_model_as_a_plain_checkpoint(
        source, tmp_path):
    torch.manual_seed(0)
    model = load_model(source, LABELS)
    model.save(tmp_path / "pretrained")
    pretrained = {name: linear.weight.detach().clone() for name, linear in block_linears(model).items()}
    resolved = resolve(TRAIN, "lora")
    resolved.strategy.prepare(model, resolved.options)
    set_trainable(model, resolved)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pixels, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    model.train()
    for _ in range(3):  # lora_B starts at zero, so lora_A has no gradient until the second step
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(pixels), labels).backward()
        optimizer.step()
    for name, parameter in model.named_parameters():
        assert (not torch.equal(before[name], parameter)) == parameter.requires_grad, name

    model.eval()
    with torch.no_grad():
        adapted = model(pixels)
        resolved.strategy.finish(model, resolved.options)
        merged = model(pixels)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert not any(torch.equal(pretrained[name], linear.weight) for name, linear in block_linears(model).items())

    model.save(tmp_path / "lora")
    assert saved_keys(tmp_path / "lora") == saved_keys(tmp_path / "pretrained")
    reloaded = load_model(str(tmp_path / "lora")).eval()
    assert [type(module) for module in model.modules()] == [type(module) for module in reloaded.modules()]
    assert not hasattr(model.model, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels), merged)


def test_targets_choose_layers_by_the_end_of_their_names(tiny_hf_model):
    model = load_model(str(tiny_hf_model), LABELS)
    resolved = resolve(lora(targets=["fc1"]), "lora")
    resolved.strategy.prepare(model, resolved.options)
    set_trainable(model, resolved)
    adapted = {name.partition(".lora_")[0] for name, _ in model.named_parameters() if ".lora_" in name}
    assert adapted == {"model.vit.layers.0.mlp.fc1", "model.vit.layers.1.mlp.fc1"}


@pytest.mark.parametrize(("options", "message"), [
    ({"rank": 0}, "train.lora.rank=0 is not allowed"),
    ({"dropout": 1.0}, "train.lora.dropout=1.0 is not allowed"),
    ({"targets": "attention"}, "train.lora.targets='attention' is not allowed: use 'attention+mlp' or a list"),
    ({"targets": []}, "train.lora.targets=[] is not allowed"),
    ({"r": 8}, "unknown setting 'train.lora.r'"),
])
def test_bad_options_are_one_line_naming_the_setting(options, message):
    with pytest.raises(VitflowError, match=re.escape(message)) as error:
        resolve(lora(**options), "lora")
    assert "\n" not in str(error.value)


def test_a_target_that_names_no_layer_is_one_line_listing_a_blocks_layers(tiny_timm_model):
    resolved = resolve(lora(targets=["qkv", "query"]), "lora")
    with pytest.raises(VitflowError, match="train.lora.targets: 'query' names no linear layer .* attn.qkv, "
                                           "attn.proj, mlp.fc1, mlp.fc2$"):
        resolved.strategy.prepare(load_model(str(tiny_timm_model), LABELS), resolved.options)


def test_fine_tune_saves_a_merged_model_that_loads_as_trained(tiny_hf_model, tmp_path):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    split = SplitTensors(images, torch.tensor([0, 1] * 4), [f"{index}.png" for index in range(8)])
    model = load_model(str(tiny_hf_model), LABELS)
    model.save(tmp_path / "pretrained")
    result = fine_tune(model, split, split, resolve(TRAIN, "lora"), tmp_path / "run", progress=False)

    assert result.trainable_params < result.total_params
    assert saved_keys(Path(result.model_dir)) == saved_keys(tmp_path / "pretrained")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(result.model_dir).eval()(pixels), model.eval()(pixels))

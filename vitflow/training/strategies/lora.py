"""`lora`: low-rank adapters (PEFT's LoRA) on the linear layers of every transformer block train with the head;
the pretrained weights stay frozen. Before saving, the adapters are merged into the weights they adapt, so the
saved model is an ordinary checkpoint of its library, with the same keys as the pretrained one.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from vitflow.errors import VitflowError
from vitflow.training.strategies.base import Strategy

EVERY_LINEAR = "attention+mlp"  # every linear layer of every block: q/k/v (or qkv), the attention output, the MLP


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(default=8, ge=1, description="r: the rank of each adapter's weight update")
    alpha: float = Field(default=16, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on each adapter's input while training")
    targets: str | list[str] = Field(default=EVERY_LINEAR, description=f"{EVERY_LINEAR!r}, or the names (or name "
                                     "endings, e.g. qkv, mlp.fc1) of the linear layers in the blocks to adapt")

    @field_validator("targets", mode="plain")  # "plain": a bad value is one message, not one per union member
    @classmethod
    def _targets(cls, value):
        if value == EVERY_LINEAR or (isinstance(value, list) and value
                                     and all(isinstance(name, str) and name for name in value)):
            return value
        raise ValueError(f"use {EVERY_LINEAR!r} or a list of linear-layer names, e.g. [qkv, proj, fc1, fc2]")


class Lora(Strategy):
    name = "lora"
    Options = LoraOptions

    def prepare(self, model, options: LoraOptions) -> None:
        """Wrap the targeted linear layers of `model.model` in LoRA layers (adapters start as a zero update)."""
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                            target_modules=adapted_layers(model, options.targets), bias="none")
        inject_adapter_in_model(config, model.model)

    def trainable_modules(self, model, options: LoraOptions) -> list[nn.Module]:
        """The head and every adapter's two low-rank factors."""
        from peft.tuners.lora import LoraLayer

        layers = [module for module in model.model.modules() if isinstance(module, LoraLayer)]
        return [model.head, *(factor for layer in layers for factor in (layer.lora_A, layer.lora_B))]

    def finish(self, model, options: LoraOptions) -> None:
        """Add each adapter's update into the weight it adapts and put the plain linear layer back in its place."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        adapted = [(name, module) for name, module in model.model.named_modules() if isinstance(module, BaseTunerLayer)]
        with torch.no_grad():
            for name, layer in adapted:
                layer.merge()
                parent, _, child = name.rpartition(".")
                setattr(model.model.get_submodule(parent), child, layer.get_base_layer())
        del model.model.peft_config  # inject_adapter_in_model's record of the adapters, gone with them


def adapted_layers(model, targets: str | list[str]) -> list[str]:
    """The names (in `model.model`) of the linear layers inside the transformer blocks that `targets` selects."""
    inside_blocks = {id(module) for module in model.blocks.modules()}
    linears = [name for name, module in model.model.named_modules()
               if isinstance(module, nn.Linear) and id(module) in inside_blocks]
    if targets == EVERY_LINEAR:
        return linears

    def selected(name: str, target: str) -> bool:
        return name == target or name.endswith(f".{target}")

    for target in targets:
        if not any(selected(name, target) for name in linears):
            in_a_block = [name for name, module in model.blocks[0].named_modules() if isinstance(module, nn.Linear)]
            raise VitflowError(f"train.lora.targets: {target!r} names no linear layer in the model's transformer "
                               f"blocks; a block's linear layers are {', '.join(in_a_block)}")
    return [name for name in linears if any(selected(name, target) for target in targets)]

"""One explanation pass: run a transformers or timm ViT and capture its attention maps (and their gradients).

The model's backend (`vitflow.models.BACKENDS`) switches it to eager, non-fused attention for that pass only
and restores it afterwards, so training and serving keep the fast attention kernels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from vitflow.models import Captured, backend_of_module


def capture_attentions(model: nn.Module, pixel_values: Tensor, target_class: int | Tensor | None = None) -> Captured:
    """Run one explanation pass of a transformers or timm ViT on [B, 3, H, W] and capture its attention.

    With `target_class` (one class for every image, or a [B] tensor of one class per image), each image's
    logit of its class is backpropagated to the attention maps (parameter .grad fields are left untouched).
    The model's attention implementation and the training flags of all its modules are restored afterwards.
    """
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be [B, C, H, W], got shape {tuple(pixel_values.shape)}")
    run = backend_of_module(model).run_with_attentions

    with _eval_mode(model), torch.set_grad_enabled(target_class is not None):
        if target_class is not None:
            # Makes the graph reach the attention maps even when every parameter is frozen.
            pixel_values = pixel_values.detach().requires_grad_(True)
        captured = run(model, pixel_values)
        if target_class is None:
            return captured
        logits = captured.logits
        if logits is None:
            raise ValueError(f"{type(model).__name__} returns no logits, so target_class cannot be used")
        targets = torch.as_tensor(target_class, device=logits.device).expand(logits.shape[0])
        if targets.min() < 0 or targets.max() >= logits.shape[-1]:
            raise ValueError(f"target_class {target_class} out of range for {logits.shape[-1]} classes")
        # Images do not interact in a forward pass, so the gradient of the summed target logits gives each
        # image the gradient of its own target logit.
        gradients = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), captured.attentions)
    return dataclasses.replace(
        captured,
        attentions=[a.detach() for a in captured.attentions],
        gradients=list(gradients),
        logits=logits.detach(),
    )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put `model` in eval mode, then restore every module's own training flag."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training

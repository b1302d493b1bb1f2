"""Validation loss and accuracy, computed the same way by every strategy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from vitflow.data.cache import SplitTensors
from vitflow.inference import predict_logits


def validate(model, val: SplitTensors, batch_size: int, accelerator: Accelerator) -> dict:
    """{"val_loss", "val_accuracy"} of `model` on `val`, in the training's precision. Every process scores
    the whole split (validation sets are small), so all of them agree on the best epoch."""
    with accelerator.autocast():
        logits = predict_logits(model, val.images, batch_size).float()
    return validation_metrics(logits, val.labels.to(logits.device))


def validation_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    return {"val_loss": F.cross_entropy(logits, labels).item(),
            "val_accuracy": (logits.argmax(1) == labels).float().mean().item()}

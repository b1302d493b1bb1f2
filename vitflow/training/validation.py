"""Validation loss and accuracy, computed the same way by every strategy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitflow.data.cache import SplitTensors
from vitflow.inference import predict_logits
from vitflow.training import distributed


def validate(model, val: SplitTensors, batch_size: int) -> dict:
    """{"val_loss", "val_accuracy"} of `model` on `val`; under torchrun each rank scores a share."""
    logits = distributed.gather_rows(lambda images: predict_logits(model, images, batch_size), val.images)
    return validation_metrics(logits, val.labels.to(logits.device))


def validation_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    return {"val_loss": F.cross_entropy(logits, labels).item(),
            "val_accuracy": (logits.argmax(1) == labels).float().mean().item()}

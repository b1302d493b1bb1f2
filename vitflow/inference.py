"""The one batched-inference function: a model over preprocessed uint8 images, a batch at a time."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from vitflow.data.images import normalize
from vitflow.models import DataConfig


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, data_config: DataConfig,
            batch_size: int, device: torch.device | None = None, progress: str | None = None) -> torch.Tensor:
    """`fn` on normalised pixels for uint8 images [N, 3, S, S], `batch_size` at a time, outputs concatenated.

    Each batch is moved to `device` (when given) as uint8 and normalised there. `progress`: a bar's label.
    """
    chunks = images.split(batch_size)
    return torch.cat([fn(normalize(chunk if device is None else chunk.to(device), data_config))
                      for chunk in tqdm(chunks, desc=progress, disable=progress is None, leave=False)])


def predict_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int,
                   data_config: DataConfig | None = None) -> torch.Tensor:
    """Logits of `model` (an `ImageClassifier`, or an `ExportedModel` that places its inputs itself) on uint8 images.

    A torch model is put in eval mode and fed on the device its parameters are on.
    """
    device = None
    if isinstance(model, nn.Module):
        model.eval()
        device = next(model.parameters()).device
    return batched(model, images, data_config or model.data_config, batch_size, device)

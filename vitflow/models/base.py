"""One interface over pretrained image classifiers, whatever library they come from.

An `ImageClassifier` holds the library's model (`.model`), its class labels, and the preprocessing
(`DataConfig`) that travels with it. A backend module (`transformers_backend`, `timm_backend`) subclasses
it, loads checkpoints, and captures attention maps for explanations.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

SIDECAR = "vitflow.json"  # backend, labels and data config saved beside the weights


@dataclass(frozen=True)
class DataConfig:
    """How images must be prepared for a model: resize, center-crop, normalise."""

    image_size: int  # side of the square the model sees
    resize_size: int  # the short side is resized to this before the center crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # "bicubic" | "bilinear" | "nearest"
    crop_offset: str = "floor"  # how the model's library centres an odd margin: "floor" (transformers) | "round" (timm)

    @classmethod
    def from_dict(cls, values: dict) -> DataConfig:
        return cls(int(values["image_size"]), int(values["resize_size"]), tuple(values["mean"]), tuple(values["std"]),
                   values["interpolation"], values.get("crop_offset", "floor"))

    def with_image_size(self, image_size: int | None) -> DataConfig:
        """The same config at another input size, keeping the resize/crop ratio."""
        if not image_size or image_size == self.image_size:
            return self
        resize = round(self.resize_size * image_size / self.image_size)
        return replace(self, image_size=image_size, resize_size=resize)


@dataclass
class Captured:
    """One explanation pass: attention maps [B, H, N, N] per layer (first first), their gradients
    w.r.t. the target logit (None without a target), the logits, and the token layout."""

    attentions: list[torch.Tensor]
    gradients: list[torch.Tensor] | None
    logits: torch.Tensor | None
    grid: tuple[int, int]
    num_prefix_tokens: int
    distilled: bool


class ImageClassifier(nn.Module):
    """forward(pixels) -> logits; forward_features(pixels) -> pre-logits features; forward_head(features)
    -> logits; `blocks`, `final_norm` and `head` for freezing; `save(dir)` for a checkpoint `load_model` reads."""

    backend: ClassVar[str]

    def __init__(self, model: nn.Module, labels: list[str], data_config: DataConfig, source: str):
        super().__init__()
        self.model = model
        self.labels = list(labels)
        self.data_config = data_config
        self.source = source

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    @property
    def head(self) -> nn.Module:
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def save_weights(self, directory: Path) -> None:
        raise NotImplementedError

    @property
    def attention_kernel(self) -> str:
        """How it computes attention now: "sdpa" (PyTorch's fused `scaled_dot_product_attention`) or "eager"
        (matmul + softmax, the same function)."""
        raise NotImplementedError

    def set_attention(self, kernel: str) -> None:
        """Compute attention with `kernel` ("sdpa" or "eager") from now on."""
        raise NotImplementedError

    def set_patch_dropout(self, rate: float) -> None:
        """While training, keep a random `1 - rate` of each image's patch tokens after the embeddings (timm's
        `PatchDropout`; class and other prefix tokens always stay): fewer tokens, less compute. Evaluation sees
        every patch; rate 0 turns it off."""
        raise NotImplementedError

    def save(self, directory: Path | str) -> Path:
        """Write safetensors weights, the model config, preprocessing and labels into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_weights(directory)
        write_sidecar(directory, self)
        return directory


def write_sidecar(directory: Path, classifier: ImageClassifier, **extra) -> None:
    """The sidecar `load_model` reads first: backend, labels, source and data config (and e.g. the precision)."""
    sidecar = {"backend": classifier.backend, "labels": classifier.labels, "source": classifier.source,
               "data_config": asdict(classifier.data_config), **extra}
    (directory / SIDECAR).write_text(json.dumps(sidecar, indent=2))


def read_sidecar(directory: Path | str) -> dict:
    """The sidecar of a directory `save` wrote ({} for other checkpoints)."""
    sidecar = Path(directory) / SIDECAR
    return json.loads(sidecar.read_text()) if sidecar.is_file() else {}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__

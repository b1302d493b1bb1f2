"""Pretrained Vision Transformers behind one interface, from any registered backend.

`load_model(source, labels)` accepts a Hugging Face model id or checkpoint directory (ViT, DeiT, DINOv2,
...) or a timm model name or directory, and returns an `ImageClassifier` with its classification head
sized for `labels` and the `DataConfig` that travels with it. A new model family is one backend module
(`load`, `recognises_checkpoint`, `recognises_name`, `owns`, `run_with_attentions`) and one line in `BACKENDS`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from torch import nn

from vitflow.config import ModelConfig
from vitflow.errors import VitflowError
from vitflow.models import timm_backend, transformers_backend
from vitflow.models.base import SIDECAR, Captured, DataConfig, ImageClassifier, count_parameters, read_sidecar

# Order matters for bare names: a timm model name is taken as timm, anything else as a hub id.
BACKENDS: dict[str, ModuleType] = {backend.name: backend for backend in (
    timm_backend,
    transformers_backend,
)}

__all__ = ["BACKENDS", "SIDECAR", "Captured", "DataConfig", "ImageClassifier", "backend_of_module",
           "count_parameters", "load_model", "load_pretrained", "resolve_backend"]


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def load_model(source: str, labels: list[str] | None = None, image_size: int | None = None,
               trust_remote_code: bool = False, allow_pickle: bool = False) -> ImageClassifier:
    """Load `source` and, when `labels` differ from the model's own, fit a new head for them.

    `source`: a local directory (a vitflow, transformers or timm checkpoint), a Hugging Face
    model id, or a timm model name; prefix `hf:` or `timm:` to choose the library explicitly.
    `image_size`: run the model at this input size instead of its own (None keeps its own).
    Weights load from safetensors only, unless `allow_pickle` (pickles can run code when loaded).
    An fp16/bf16 export (`vitflow.export`, sidecar `precision`) loads upcast to float32.
    """
    backend, name = resolve_backend(source)
    if not allow_pickle:
        check_safetensors_only(name)
    return BACKENDS[backend].load(name, labels, source, image_size, trust_remote_code, allow_pickle)


def load_pretrained(model: ModelConfig, labels: list[str] | None = None,
                    image_size: int | None = None) -> ImageClassifier:
    """The `model` section's pretrained model, loaded with its security settings."""
    return load_model(model.source, labels, image_size, model.trust_remote_code, model.allow_pickle)


def check_safetensors_only(name: str) -> None:
    """A local checkpoint directory must hold safetensors weights; one with only pickled weights is refused."""
    directory = Path(name)
    if not directory.is_dir() or any(directory.glob("*.safetensors")):
        return
    pickled = sorted(path.name for pattern in PICKLED_WEIGHTS for path in directory.glob(pattern))
    if pickled:
        raise VitflowError(f"{directory}: holds only pickled weights ({', '.join(pickled)}), which can run code when "
                           "loaded; convert them to safetensors, or set model.allow_pickle: true if you trust them")


def resolve_backend(source: str) -> tuple[str, str]:
    """(backend name, what that backend loads) for a model source; a VitflowError when it is not one."""
    for backend in BACKENDS:
        if source.startswith(f"{backend}:"):
            return backend, source.removeprefix(f"{backend}:")
    path = Path(source)
    if path.is_dir():
        sidecar = read_sidecar(path)
        if sidecar.get("precision") == "int8":
            raise VitflowError(f"{path}: an int8 ONNX export, not a torch checkpoint; run it with "
                               "vitflow.precision.load_exported")
        if sidecar:
            return sidecar["backend"], source
        config_file = path / "config.json"
        if not config_file.is_file():
            raise VitflowError(f"{path}: not a model checkpoint (no config.json); pass a model directory, "
                               "a Hugging Face id or a timm name")
        config = json.loads(config_file.read_text())
        return next(name for name, backend in BACKENDS.items() if backend.recognises_checkpoint(config)), source
    if path.exists() or source.startswith((".", "/")):
        raise VitflowError(f"{source}: not a model directory; pass a checkpoint directory, a Hugging Face id "
                           "or a timm name")
    return next(name for name, backend in BACKENDS.items() if backend.recognises_name(source)), source


def backend_of_module(model: nn.Module) -> ModuleType:
    """The backend whose library built `model` (a transformers or timm module)."""
    for backend in BACKENDS.values():
        if backend.owns(model):
            return backend
    raise TypeError(f"{type(model).__name__} is neither a transformers PreTrainedModel nor a timm ViT")

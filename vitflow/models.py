"""Load a pretrained Vision Transformer from transformers or timm behind one interface.

`load_model(source, labels)` accepts a Hugging Face model id or checkpoint directory
(ViT, DeiT, DINOv2, ...) or a timm model name or directory, and returns an
`ImageClassifier`: the model, its classification head sized for `labels`, and the
preprocessing (`DataConfig`) that travels with it. `ImageClassifier.save(dir)` writes
safetensors weights plus configs that `load_model(dir)` reads back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from vitflow.errors import VitflowError

SIDECAR = "vitflow.json"  # backend, labels and data config saved beside the weights
HF_HEAD_NAMES = ("classifier",)


@dataclass(frozen=True)
class DataConfig:
    """How images must be prepared for a model: resize, center-crop, normalise."""

    image_size: int  # side of the square the model sees
    resize_size: int  # the short side is resized to this before the center crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # "bicubic" | "bilinear" | "nearest"

    @classmethod
    def from_dict(cls, values: dict) -> DataConfig:
        return cls(int(values["image_size"]), int(values["resize_size"]), tuple(values["mean"]), tuple(values["std"]),
                   values["interpolation"])

    def with_image_size(self, image_size: int | None) -> DataConfig:
        """The same config at another input size, keeping the resize/crop ratio."""
        if not image_size or image_size == self.image_size:
            return self
        resize = round(self.resize_size * image_size / self.image_size)
        return DataConfig(image_size, resize, self.mean, self.std, self.interpolation)


class ImageClassifier(nn.Module):
    """One interface over a transformers or timm image classifier.

    forward(pixels) -> logits; forward_features(pixels) -> pre-logits features;
    forward_head(features) -> logits; `blocks`, `final_norm` and `head` for freezing.
    """

    def __init__(self, model: nn.Module, backend: str, labels: list[str], data_config: DataConfig, source: str):
        super().__init__()
        self.model = model
        self.backend = backend
        self.labels = list(labels)
        self.data_config = data_config
        self.source = source
        self._hf_kwargs = hf_forward_kwargs(model, data_config.image_size) if backend == "hf" else {}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.backend == "timm":
            return self.model(pixel_values)
        return self.model(pixel_values=pixel_values, **self._hf_kwargs).logits

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The features the head reads (for transformers models: whatever goes into `classifier`)."""
        if self.backend == "timm":
            return self.model.forward_head(self.model.forward_features(pixel_values), pre_logits=True)
        captured: list[torch.Tensor] = []
        hook = self.head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            self.model(pixel_values=pixel_values, **self._hf_kwargs)
        finally:
            hook.remove()
        return captured[0]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    @property
    def head(self) -> nn.Module:
        if self.backend == "timm":
            return self.model.get_classifier()
        return self.model.classifier

    @property
    def blocks(self) -> nn.ModuleList:
        if self.backend == "timm":
            return self.model.blocks
        depth = self.model.config.num_hidden_layers
        for module in self.model.base_model.modules():
            if isinstance(module, nn.ModuleList) and len(module) == depth:
                return module
        raise VitflowError(f"model {self.source!r}: cannot find its {depth} transformer blocks")

    @property
    def final_norm(self) -> nn.Module:
        if self.backend == "timm":
            norm = self.model.fc_norm if isinstance(self.model.fc_norm, nn.LayerNorm) else self.model.norm
            return norm
        return self.model.base_model.layernorm

    def save(self, directory: Path | str) -> Path:
        """Write safetensors weights, the model config, preprocessing and labels into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.backend == "timm":
            import timm.models

            timm.models.save_for_hf(self.model, str(directory), model_config={"label_names": self.labels},
                                    safe_serialization=True)
        else:
            self.model.save_pretrained(directory)
            _hf_image_processor(self.data_config).save_pretrained(directory)
        sidecar = {"backend": self.backend, "labels": self.labels, "source": self.source,
                   "data_config": asdict(self.data_config)}
        (directory / SIDECAR).write_text(json.dumps(sidecar, indent=2))
        return directory


def load_model(source: str, labels: list[str] | None = None, image_size: int | None = None,
               trust_remote_code: bool = False) -> ImageClassifier:
    """Load `source` and, when `labels` differ from the model's own, fit a new head for them.

    `source`: a local directory (a vitflow, transformers or timm checkpoint), a Hugging Face
    model id, or a timm model name; prefix `hf:` or `timm:` to choose the library explicitly.
    `image_size`: run the model at this input size instead of its own (None keeps its own).
    An fp16/bf16 export (`tasks.export`, sidecar `precision`) loads upcast to float32.
    """
    backend, name = _resolve_backend(source)
    if backend == "timm":
        return _load_timm(name, labels, source, image_size)
    return _load_hf(name, labels, source, image_size, trust_remote_code)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _resolve_backend(source: str) -> tuple[str, str]:
    for prefix in ("hf:", "timm:"):
        if source.startswith(prefix):
            return prefix[:-1], source[len(prefix):]
    path = Path(source)
    if path.is_dir():
        if (path / SIDECAR).is_file():
            sidecar = json.loads((path / SIDECAR).read_text())
            if sidecar.get("precision") == "int8":
                raise VitflowError(f"{path}: an int8 ONNX export, not a torch checkpoint; run it with "
                                   "vitflow.precision.load_exported")
            return sidecar["backend"], source
        config_file = path / "config.json"
        if not config_file.is_file():
            raise VitflowError(f"{path}: not a model checkpoint (no config.json); pass a model directory, "
                               "a Hugging Face id or a timm name")
        config = json.loads(config_file.read_text())
        return ("timm" if "architecture" in config else "hf"), source
    if path.exists() or source.startswith((".", "/")):
        raise VitflowError(f"{source}: not a model directory; pass a checkpoint directory, a Hugging Face id "
                           "or a timm name")
    import timm

    if "/" not in source and timm.is_model(source):
        return "timm", source
    return "hf", source


def _load_hf(name: str, labels: list[str] | None, source: str, image_size: int | None,
             trust_remote_code: bool) -> ImageClassifier:
    import transformers
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    # The new head's size mismatch is expected (ignore_mismatched_sizes); keep the load quiet.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    sidecar = Path(name) / SIDECAR
    saved = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if saved.get("precision") in ("fp16", "bf16"):
        kwargs["dtype"] = torch.float32  # reduced-precision exports load upcast, as timm's loader does
    if labels is not None:
        kwargs.update(id2label=dict(enumerate(labels)),
                      label2id={label: i for i, label in enumerate(labels)}, ignore_mismatched_sizes=True)
    try:
        model = AutoModelForImageClassification.from_pretrained(name, **kwargs)
        processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise VitflowError(f"model {name!r}: cannot load it ({_first_line(error)}); pass a local checkpoint "
                           "directory, or make the Hugging Face hub or its cache reachable") from None
    if not hasattr(model, "classifier"):
        raise VitflowError(f"model {name!r}: {type(model).__name__} has no single `classifier` head; "
                           "use a ViT, DeiT or DINOv2 image-classification model")
    model_labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if saved:
        data_config = DataConfig.from_dict(saved["data_config"])
    else:
        data_config = _data_config_from_processor(processor)
    return ImageClassifier(model, "hf", model_labels, data_config.with_image_size(image_size), source)


def _load_timm(name: str, labels: list[str] | None, source: str, image_size: int | None) -> ImageClassifier:
    import timm

    is_dir = Path(name).is_dir()
    model_id = f"local-dir:{name}" if is_dir else name
    saved_labels: list[str] | None = None
    if is_dir:
        saved_labels = json.loads((Path(name) / "config.json").read_text()).get("label_names")
    kwargs = {"num_classes": len(labels)} if labels is not None and labels != saved_labels else {}
    if image_size:
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(model_id, pretrained=True, **kwargs)
    except (RuntimeError, OSError, ValueError) as error:
        raise VitflowError(f"timm model {name!r}: cannot load it ({_first_line(error)}); pass a local timm "
                           "checkpoint directory, or make the Hugging Face hub or its cache reachable") from None
    model_labels = labels if labels is not None else saved_labels or [str(i) for i in range(model.num_classes)]
    data = timm.data.resolve_data_config(model=model)
    image_size = data["input_size"][-1]
    data_config = DataConfig(image_size=image_size, resize_size=int(image_size / data["crop_pct"]),
                             mean=tuple(data["mean"]), std=tuple(data["std"]), interpolation=data["interpolation"])
    return ImageClassifier(model, "timm", model_labels, data_config, source)


def _data_config_from_processor(processor) -> DataConfig:
    size = dict(processor.size)
    crop = dict(getattr(processor, "crop_size", None) or {})
    if getattr(processor, "do_center_crop", False) and crop:
        image_size = crop["height"]
        resize_size = size.get("shortest_edge") or size["height"]
    else:
        image_size = size.get("height") or size["shortest_edge"]
        resize_size = image_size
    resample = int(getattr(processor.resample, "value", processor.resample))
    interpolation = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(resample, "bicubic")
    return DataConfig(image_size=int(image_size), resize_size=int(resize_size),
                      mean=tuple(float(m) for m in processor.image_mean),
                      std=tuple(float(s) for s in processor.image_std), interpolation=interpolation)


def _hf_image_processor(data_config: DataConfig):
    """A transformers image processor that prepares images exactly as `data_config` says."""
    from transformers import BitImageProcessor

    side = data_config.image_size
    return BitImageProcessor(
        size={"shortest_edge": data_config.resize_size}, crop_size={"height": side, "width": side},
        do_center_crop=True, resample={"nearest": 0, "bilinear": 2, "bicubic": 3}[data_config.interpolation],
        image_mean=list(data_config.mean), image_std=list(data_config.std), do_convert_rgb=True)


def hf_forward_kwargs(model: nn.Module, image_size: int) -> dict:
    """ViT-style transformers models need `interpolate_pos_encoding` to run at a size other than their config's."""
    import inspect

    accepts = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    native_size = getattr(model.config, "image_size", image_size)
    return {"interpolate_pos_encoding": True} if accepts and native_size != image_size else {}


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__

"""Hugging Face transformers image classifiers (ViT, DeiT, DINOv2, ...): loading, saving, attention capture."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from vitflow.errors import VitflowError
from vitflow.models.base import Captured, DataConfig, ImageClassifier, first_line, read_sidecar

name = "hf"


class TransformersClassifier(ImageClassifier):
    backend = name

    def __init__(self, model: nn.Module, labels: list[str], data_config: DataConfig, source: str):
        super().__init__(model, labels, data_config, source)
        self._forward_kwargs = forward_kwargs(model, data_config.image_size)
        self._patch_dropout: torch.utils.hooks.RemovableHandle | None = None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, **self._forward_kwargs).logits

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Whatever goes into `classifier` (the models differ in how they pool)."""
        captured: list[torch.Tensor] = []
        hook = self.head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            self.model(pixel_values=pixel_values, **self._forward_kwargs)
        finally:
            hook.remove()
        return captured[0]

    @property
    def head(self) -> nn.Module:
        return self.model.classifier

    @property
    def blocks(self) -> nn.ModuleList:
        depth = self.model.config.num_hidden_layers
        for module in self.model.base_model.modules():
            if isinstance(module, nn.ModuleList) and len(module) == depth:
                return module
        raise VitflowError(f"model {self.source!r}: cannot find its {depth} transformer blocks")

    @property
    def final_norm(self) -> nn.Module:
        return self.model.base_model.layernorm

    @property
    def attention_kernel(self) -> str:
        return self.model.config._attn_implementation

    def set_attention(self, kernel: str) -> None:
        if kernel == self.attention_kernel:
            return
        try:
            self.model.set_attn_implementation(kernel)
        except ValueError as error:
            raise VitflowError(f"train.attention={kernel}: model {self.source!r} cannot use it "
                               f"({first_line(error)}); set train.attention: auto") from None

    def set_patch_dropout(self, rate: float) -> None:
        """A hook on the embeddings' output (tokens with position embeddings added) drops patches from it."""
        from timm.layers import PatchDropout

        if self._patch_dropout is not None:
            self._patch_dropout.remove()
            self._patch_dropout = None
        if rate:
            dropout = PatchDropout(rate, num_prefix_tokens=prefix_tokens(self.model))
            self._patch_dropout = self.model.base_model.embeddings.register_forward_hook(
                lambda embeddings, _inputs, tokens: dropout.train(embeddings.training)(tokens))

    def save_weights(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        image_processor(self.data_config).save_pretrained(directory)


def recognises_checkpoint(config: dict) -> bool:
    """A transformers config.json (timm's has an `architecture` key instead)."""
    return "architecture" not in config


def recognises_name(model_name: str) -> bool:
    return True  # anything else is taken as a hub id


def load(model_name: str, labels: list[str] | None, source: str, image_size: int | None,
         trust_remote_code: bool, allow_pickle: bool = False) -> ImageClassifier:
    import transformers
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    # The new head's size mismatch is expected (ignore_mismatched_sizes); keep the load quiet.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    kwargs: dict = {"trust_remote_code": trust_remote_code, "use_safetensors": None if allow_pickle else True}
    saved = read_sidecar(model_name) if Path(model_name).is_dir() else {}
    if saved.get("precision") in ("fp16", "bf16"):
        kwargs["dtype"] = torch.float32  # reduced-precision exports load upcast, as timm's loader does
    if labels is not None:
        kwargs.update(id2label=dict(enumerate(labels)),
                      label2id={label: i for i, label in enumerate(labels)}, ignore_mismatched_sizes=True)
    try:
        model = AutoModelForImageClassification.from_pretrained(model_name, **kwargs)
        processor = AutoImageProcessor.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise VitflowError(f"model {model_name!r}: cannot load it ({first_line(error)}); pass a local checkpoint "
                           "directory, or make the Hugging Face hub or its cache reachable") from None
    if not hasattr(model, "classifier"):
        raise VitflowError(f"model {model_name!r}: {type(model).__name__} has no single `classifier` head; "
                           "use a ViT, DeiT or DINOv2 image-classification model")
    model_labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    data_config = DataConfig.from_dict(saved["data_config"]) if saved else data_config_of(processor)
    return TransformersClassifier(model, model_labels, data_config.with_image_size(image_size), source)


def data_config_of(processor) -> DataConfig:
    """The `DataConfig` a transformers image processor applies."""
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


def image_processor(data_config: DataConfig):
    """A transformers image processor that prepares images exactly as `data_config` says."""
    from transformers import BitImageProcessor

    side = data_config.image_size
    return BitImageProcessor(
        size={"shortest_edge": data_config.resize_size}, crop_size={"height": side, "width": side},
        do_center_crop=True, resample={"nearest": 0, "bilinear": 2, "bicubic": 3}[data_config.interpolation],
        image_mean=list(data_config.mean), image_std=list(data_config.std), do_convert_rgb=True)


def forward_kwargs(model: nn.Module, image_size: int) -> dict:
    """ViT-style transformers models need `interpolate_pos_encoding` to run at a size other than their config's."""
    accepts = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    native_size = getattr(model.config, "image_size", image_size)
    return {"interpolate_pos_encoding": True} if accepts and native_size != image_size else {}


# --------------------------------------------------------------------------- attention capture


def owns(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def run_with_attentions(model: nn.Module, pixel_values: torch.Tensor) -> Captured:
    """Forward with eager attention (which returns the weights) and read them; the implementation is restored."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        outputs = model(pixel_values=pixel_values, output_attentions=True,
                        **forward_kwargs(model, pixel_values.shape[-1]))
    finally:
        model.set_attn_implementation(previous)
    attentions = list(outputs.attentions or ())
    layers = model.config.num_hidden_layers
    if len(attentions) != layers:
        raise RuntimeError(f"captured {len(attentions)} attention maps for {layers} layers")

    patch = model.config.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return Captured(
        attentions=attentions,
        gradients=None,
        logits=getattr(outputs, "logits", None),
        grid=(pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw),
        num_prefix_tokens=prefix_tokens(model),
        distilled=is_distilled(model),
    )


def is_distilled(model: nn.Module) -> bool:
    return any(getattr(m, "distillation_token", None) is not None for m in model.modules())


def prefix_tokens(model: nn.Module) -> int:
    """The tokens before the patches: class, distillation (DeiT) and register tokens."""
    return 1 + int(is_distilled(model)) + getattr(model.config, "num_register_tokens", 0)

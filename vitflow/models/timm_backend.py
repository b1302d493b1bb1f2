"""timm Vision Transformers: loading, saving, attention capture."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vitflow.errors import VitflowError
from vitflow.models.base import Captured, DataConfig, ImageClassifier, first_line

name = "timm"


class TimmClassifier(ImageClassifier):
    backend = name

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)

    @property
    def distilled(self) -> bool:
        """A distilled model (DeiT): one head on the class token, one on the distillation token, averaged."""
        return isinstance(self.model.get_classifier(), tuple)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(pixel_values)
        if self.distilled:  # both tokens, each for its own head, as the model's forward uses them
            return torch.cat([tokens[:, 0], tokens[:, 1]], dim=-1)
        return self.model.forward_head(tokens, pre_logits=True)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        if self.distilled:
            head, head_dist = self.model.get_classifier()
            on_class_token, on_distillation_token = features.chunk(2, dim=-1)
            return (head(on_class_token) + head_dist(on_distillation_token)) / 2
        return self.head(features)

    @property
    def head(self) -> nn.Module:
        classifier = self.model.get_classifier()
        return nn.ModuleList(classifier) if isinstance(classifier, tuple) else classifier

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    @property
    def final_norm(self) -> nn.Module:
        return self.model.fc_norm if isinstance(self.model.fc_norm, nn.LayerNorm) else self.model.norm

    @property
    def attention_kernel(self) -> str:
        return "sdpa" if any(layer.fused_attn for layer in self._attention_layers()) else "eager"

    def set_attention(self, kernel: str) -> None:
        for layer in self._attention_layers():
            layer.fused_attn = kernel == "sdpa"

    def _attention_layers(self) -> list[nn.Module]:
        """timm's attention layers each have a `fused_attn` switch; layers without one compute as they do."""
        return [module for module in self.model.modules() if hasattr(module, "fused_attn")]

    def set_patch_dropout(self, rate: float) -> None:
        """timm's vision transformers drop patches in their own `patch_drop` layer, after the position embedding."""
        from timm.layers import PatchDropout

        if not hasattr(self.model, "patch_drop"):
            if not rate:
                return
            raise VitflowError(f"train.patch_dropout={rate}: timm model {self.source!r} ({type(self.model).__name__}) "
                               "has no patch_drop layer; set train.patch_dropout: 0")
        self.model.patch_drop = PatchDropout(rate, num_prefix_tokens=self.model.num_prefix_tokens) if rate \
            else nn.Identity()

    def save_weights(self, directory: Path) -> None:
        import timm.models

        timm.models.save_for_hf(self.model, str(directory), model_config={"label_names": self.labels},
                                safe_serialization=True)


def recognises_checkpoint(config: dict) -> bool:
    """timm's config.json names its `architecture`."""
    return "architecture" in config


def recognises_name(model_name: str) -> bool:
    import timm

    return "/" not in model_name and timm.is_model(model_name)


def load(model_name: str, labels: list[str] | None, source: str, image_size: int | None,
         trust_remote_code: bool, allow_pickle: bool = False) -> ImageClassifier:
    import timm

    is_dir = Path(model_name).is_dir()
    model_id = f"local-dir:{model_name}" if is_dir else model_name
    saved_labels: list[str] | None = None
    if is_dir:
        saved_labels = json.loads((Path(model_name) / "config.json").read_text()).get("label_names")
    kwargs = {"num_classes": len(labels)} if labels is not None and labels != saved_labels else {}
    if image_size:
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(model_id, pretrained=True, **kwargs)
    except AssertionError:  # timm checks that its patches tile the input
        raise VitflowError(f"timm model {model_name!r}: cannot run at {image_size} px; set preprocess.image_size to "
                           "a size its patches (and stem) divide, or to null for the model's own size") from None
    except (RuntimeError, OSError, ValueError) as error:
        raise VitflowError(f"timm model {model_name!r}: cannot load it ({first_line(error)}); pass a local timm "
                           "checkpoint directory, or make the Hugging Face hub or its cache reachable") from None
    model_labels = labels if labels is not None else saved_labels or [str(i) for i in range(model.num_classes)]
    data = timm.data.resolve_data_config(model=model)
    side = data["input_size"][-1]
    data_config = DataConfig(image_size=side, resize_size=int(side / data["crop_pct"]),
                             mean=tuple(data["mean"]), std=tuple(data["std"]), interpolation=data["interpolation"],
                             crop_offset="round")  # torchvision's CenterCrop, which timm's transforms use
    return TimmClassifier(model, model_labels, data_config, source)


# --------------------------------------------------------------------------- attention capture


def owns(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


def run_with_attentions(model: nn.Module, pixel_values: torch.Tensor) -> Captured:
    """Forward with fused attention off, catching each block's softmaxed attention.

    In timm's non-fused path the post-softmax attention goes through `attn.attn_drop` (identity in
    eval mode) and its output is what multiplies the values, so a forward hook there captures it.
    """
    attns = []
    for index, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if not (hasattr(attn, "fused_attn") and hasattr(attn, "attn_drop")):
            raise TypeError(f"block {index} has no timm attention with fused_attn and attn_drop")
        attns.append(attn)

    captured: list[torch.Tensor] = []
    fused_flags = [attn.fused_attn for attn in attns]
    hooks = [attn.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out)) for attn in attns]
    try:
        for attn in attns:
            attn.fused_attn = False
        logits = model(pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
        for attn, flag in zip(attns, fused_flags, strict=True):
            attn.fused_attn = flag
    if len(captured) != len(attns):
        raise RuntimeError(f"captured {len(captured)} attention maps for {len(attns)} blocks")

    size = tuple(pixel_values.shape[-2:])
    dynamic = getattr(model, "dynamic_img_size", False)
    grid = model.patch_embed.dynamic_feat_size(size) if dynamic else model.patch_embed.grid_size
    return Captured(
        attentions=captured,
        gradients=None,
        logits=logits,
        grid=tuple(grid),
        num_prefix_tokens=model.num_prefix_tokens,
        distilled=getattr(model, "dist_token", None) is not None,
    )

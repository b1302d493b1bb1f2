"""Attention rollout for Vision Transformers (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

The math works on lists of per-layer attention maps [B, H, N, N] (first layer first). The capture
functions get those maps out of transformers and timm ViTs for one explanation pass: they switch the
model to eager (non-fused) attention and eval mode for that pass only and restore both afterwards,
so training and serving keep the fast attention kernels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor, nn
from transformers import PreTrainedModel

HEAD_FUSIONS = ("mean", "max", "min")


# --------------------------------------------------------------------------- math


def fuse_heads(attn: Tensor, mode: str = "mean") -> Tensor:
    """Fuse the heads of one layer's attention [B, H, N, N] into [B, N, N] by mean, max or min."""
    if attn.dim() != 4:
        raise ValueError(f"attention must be [B, H, N, N], got shape {tuple(attn.shape)}")
    if mode == "mean":
        return attn.mean(dim=1)
    if mode == "max":
        return attn.amax(dim=1)
    if mode == "min":
        return attn.amin(dim=1)
    raise ValueError(f"head fusion must be one of {HEAD_FUSIONS}, got {mode!r}")


def attention_rollout(attentions: Sequence[Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0) -> Tensor:
    """Roll attention out through the layers: [B, H, N, N] per layer (first layer first) -> R [B, N, N].

    Each layer's heads are fused, the lowest `discard_ratio` of its entries are zeroed (never CLS->CLS),
    the residual is added as 0.5*A + 0.5*I and rows are renormalised; then R = Â_L ⋯ Â_1.
    Every row of R sums to 1. Computed in float32.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    _check_attentions(attentions)
    return _rollout([fuse_heads(a.float(), head_fusion) for a in attentions], discard_ratio)


def gradient_rollout(attentions: Sequence[Tensor], gradients: Sequence[Tensor], discard_ratio: float = 0.0) -> Tensor:
    """Class-specific rollout: per layer relu(A * dlogit/dA) fused by head mean, then rolled out -> [B, N, N].

    `gradients` are the gradients of the chosen class's logit w.r.t. each attention map (same shapes).
    A row left all zero by the clamp becomes the identity row through the residual, so there is no NaN.
    """
    _check_attentions(attentions)
    if len(gradients) != len(attentions):
        raise ValueError(f"got {len(gradients)} gradient maps for {len(attentions)} attention maps")
    for layer, (attn, grad) in enumerate(zip(attentions, gradients, strict=True)):
        if grad.shape != attn.shape:
            raise ValueError(
                f"layer {layer}: gradient shape {tuple(grad.shape)} != attention shape {tuple(attn.shape)}"
            )
    weighted = [(a.float() * g.float()).clamp(min=0).mean(dim=1) for a, g in zip(attentions, gradients, strict=True)]
    return _rollout(weighted, discard_ratio)


def cls_patch_map(rollout: Tensor, grid: tuple[int, int], num_prefix_tokens: int, distilled: bool = False) -> Tensor:
    """Read the CLS row of a rollout [B, N, N] over the patch tokens as maps [B, gh, gw] in [0, 1].

    For distilled (DeiT) models the CLS and distillation-token rows are averaged. All
    `num_prefix_tokens` leading tokens (CLS, distillation, registers) are dropped. Each map is divided
    by its maximum: a constant positive map becomes all ones, an all-zero map stays all zeros.
    """
    if rollout.dim() != 3 or rollout.shape[1] != rollout.shape[2]:
        raise ValueError(f"rollout must be [B, N, N], got shape {tuple(rollout.shape)}")
    gh, gw = grid
    n = rollout.shape[-1]
    if num_prefix_tokens < 1 or n - num_prefix_tokens != gh * gw:
        raise ValueError(
            f"{n} tokens do not split into {num_prefix_tokens} prefix tokens (at least 1) and a {gh}x{gw} patch grid"
        )
    if distilled and num_prefix_tokens < 2:
        raise ValueError("a distilled model needs at least 2 prefix tokens (CLS and distillation)")
    rows = rollout[:, :2].mean(dim=1) if distilled else rollout[:, 0]
    maps = rows[:, num_prefix_tokens:].reshape(-1, gh, gw)
    peak = maps.amax(dim=(1, 2), keepdim=True)
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


def _check_attentions(attentions: Sequence[Tensor]) -> None:
    """Raise ValueError unless `attentions` is a non-empty list of equal-shaped [B, H, N, N] maps."""
    if len(attentions) == 0:
        raise ValueError("attentions is empty: need one [B, H, N, N] map per layer")
    shape = attentions[0].shape
    if len(shape) != 4 or shape[-1] != shape[-2]:
        raise ValueError(f"attention maps must be [B, H, N, N], got shape {tuple(shape)}")
    for layer, attn in enumerate(attentions):
        if attn.shape != shape:
            raise ValueError(f"layer {layer} has shape {tuple(attn.shape)}, layer 0 has {tuple(shape)}")


def _discard_lowest(fused: Tensor, ratio: float) -> Tensor:
    """Zero the lowest `ratio` fraction of each sample's N*N entries, never the CLS->CLS entry [0, 0]."""
    b, n, _ = fused.shape
    k = int(n * n * ratio)
    if k == 0:
        return fused
    flat = fused.reshape(b, n * n)
    candidates = flat.clone()
    candidates[:, 0] = math.inf
    lowest = candidates.topk(k, dim=1, largest=False).indices
    return flat.scatter(1, lowest, 0.0).reshape(b, n, n)


def _rollout(fused_layers: list[Tensor], discard_ratio: float) -> Tensor:
    """Discard, add the residual, renormalise rows and multiply fused layers [B, N, N]: R = Â_L ⋯ Â_1."""
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    n = fused_layers[0].shape[-1]
    eye = torch.eye(n, dtype=fused_layers[0].dtype, device=fused_layers[0].device)
    result = None
    for fused in fused_layers:
        a = 0.5 * _discard_lowest(fused, discard_ratio) + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    return result


# --------------------------------------------------------------------------- capture


@dataclasses.dataclass
class Captured:
    """One explanation pass: attention maps [B, H, N, N] per layer (first first), their gradients
    w.r.t. the target logit (None without a target), the logits, and the token layout."""

    attentions: list[Tensor]
    gradients: list[Tensor] | None
    logits: Tensor | None
    grid: tuple[int, int]
    num_prefix_tokens: int
    distilled: bool


def capture_attentions(model: nn.Module, pixel_values: Tensor, target_class: int | None = None) -> Captured:
    """Run one explanation pass of a transformers or timm ViT on [B, 3, H, W] and capture its attention.

    With `target_class`, the summed logit of that class is backpropagated to the attention maps
    (parameter .grad fields are left untouched). The model's attention implementation and the
    training flags of all its modules are restored afterwards.
    """
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be [B, C, H, W], got shape {tuple(pixel_values.shape)}")
    if isinstance(model, PreTrainedModel):
        run = _run_transformers
    elif hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):
        run = _run_timm
    else:
        raise TypeError(f"{type(model).__name__} is neither a transformers PreTrainedModel nor a timm ViT")

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
        if not 0 <= target_class < logits.shape[-1]:
            raise ValueError(f"target_class {target_class} out of range for {logits.shape[-1]} classes")
        gradients = torch.autograd.grad(logits[:, target_class].sum(), captured.attentions)
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


@contextmanager
def _eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Switch a transformers model to eager attention (which returns the weights), then switch back."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _run_transformers(model: PreTrainedModel, pixel_values: Tensor) -> Captured:
    """Forward a transformers ViT/DeiT/Dinov2 with eager attention and read its attention weights."""
    with _eager_attention(model):
        outputs = model(pixel_values=pixel_values, output_attentions=True)
    attentions = list(outputs.attentions or ())
    layers = model.config.num_hidden_layers
    if len(attentions) != layers:
        raise RuntimeError(f"captured {len(attentions)} attention maps for {layers} layers")

    patch = model.config.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    distilled = any(getattr(m, "distillation_token", None) is not None for m in model.modules())
    return Captured(
        attentions=attentions,
        gradients=None,
        logits=getattr(outputs, "logits", None),
        grid=(pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw),
        num_prefix_tokens=1 + int(distilled) + getattr(model.config, "num_register_tokens", 0),
        distilled=distilled,
    )


def _run_timm(model: nn.Module, pixel_values: Tensor) -> Captured:
    """Forward a timm VisionTransformer with fused attention off, catching each block's softmaxed attention.

    In timm's non-fused path the post-softmax attention goes through `attn.attn_drop` (identity in
    eval mode) and its output is what multiplies the values, so a forward hook there captures it.
    """
    attns = []
    for index, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if not (hasattr(attn, "fused_attn") and hasattr(attn, "attn_drop")):
            raise TypeError(f"block {index} has no timm attention with fused_attn and attn_drop")
        attns.append(attn)

    captured: list[Tensor] = []
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


# --------------------------------------------------------------------------- explain + drawing


def explain(
    model: nn.Module,
    pixel_values: Tensor,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    target_class: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Explain a batch [B, 3, H, W]: returns (patch maps [B, gh, gw] in [0, 1], logits [B, classes]).

    Plain attention rollout, or gradient rollout for `target_class` (that one always fuses heads by mean).
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if target_class is not None and head_fusion != "mean":
        raise ValueError("gradient rollout (target_class given) fuses heads by mean only")
    captured = capture_attentions(model, pixel_values, target_class)
    if target_class is None:
        rollout = attention_rollout(captured.attentions, head_fusion, discard_ratio)
    else:
        rollout = gradient_rollout(captured.attentions, captured.gradients, discard_ratio)
    maps = cls_patch_map(rollout, captured.grid, captured.num_prefix_tokens, captured.distilled)
    return maps, captured.logits


def overlay_heatmap(
    image: Image.Image, patch_map: np.ndarray | Tensor, alpha: float = 0.5, cmap: str = "jet"
) -> Image.Image:
    """Blend a colormapped patch map [gh, gw] (values in [0, 1]), upsampled bilinearly, over an RGB image."""
    image = image.convert("RGB")
    grid = torch.as_tensor(patch_map, dtype=torch.float32).detach().cpu()
    if grid.dim() != 2:
        raise ValueError(f"patch_map must be [gh, gw], got shape {tuple(grid.shape)}")
    upsampled = F.interpolate(grid[None, None], size=(image.height, image.width), mode="bilinear")[0, 0]
    colours = matplotlib.colormaps[cmap](upsampled.numpy())[..., :3]
    heat = Image.fromarray((colours * 255).round().astype(np.uint8))
    return Image.blend(image, heat, alpha)


def _tile_title(true_label: str, pred_label: str, prob: float) -> str:
    """Title of one grid tile, e.g. 'true: cat / pred: dog (p=0.93)'."""
    return f"true: {true_label} / pred: {pred_label} (p={prob:.2f})"


def save_overlay_grid(items: Sequence[dict], path: str | Path, cols: int = 4) -> Path:
    """Write one PNG grid of heatmap overlays and return its path.

    Each item is a dict with `image` (PIL), `map` ([gh, gw]), `true_label`, `pred_label` and `prob`.
    """
    if not items:
        raise ValueError("no items to draw")
    cols = min(cols, len(items))
    rows = math.ceil(len(items) / cols)
    fig = Figure(figsize=(3 * cols, 3.3 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, item in zip(axes, items, strict=False):
        ax.imshow(overlay_heatmap(item["image"], item["map"]))
        ax.set_title(_tile_title(item["true_label"], item["pred_label"], item["prob"]), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path

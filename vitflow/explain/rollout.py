"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

Written here because no maintained library computes it over both transformers and timm models: the math
works on lists of per-layer attention maps [B, H, N, N] (first layer first), whatever model made them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

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
    """Class-specific rollout (Chefer et al. 2021): per layer A ⊙ relu(dlogit/dA), averaged over heads, then
    rolled out like attention (residual added, rows renormalised, layers multiplied) -> [B, N, N].

    `gradients` are the gradients of the explained class's logit w.r.t. each attention map (same shapes).
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
    weighted = [(a.float() * g.float().clamp(min=0)).mean(dim=1) for a, g in zip(attentions, gradients, strict=True)]
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

"""How faithful a heatmap is to the model: the deletion metric (Petsiuk et al. 2018, "RISE").

Patches are greyed out in order of attribution, most important first, and the explained class's probability
is read after each step. When the map points at what the model uses, the probability falls fast and the area
under that curve is low. The same curve for random orders is the baseline a map has to beat.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

DELETION_STEPS = 10
RANDOM_ORDERS = 3


@torch.no_grad()
def deletion_curve(model: Callable[[Tensor], Tensor], pixel_values: Tensor, maps: Tensor, targets: Tensor,
                   steps: int = DELETION_STEPS) -> Tensor:
    """Probabilities [B, steps + 1] of each image's `targets` class as its patches are greyed out.

    `pixel_values`: normalised [B, 3, H, W]; `maps`: attributions [B, gh, gw] over the patch grid, whose
    highest patches go first; `model`: pixels -> logits, in eval mode. A deleted patch is set to 0, the
    dataset mean after normalisation. Point k has round(k * P / steps) of the P patches deleted.
    """
    b, _, height, width = pixel_values.shape
    gh, gw = maps.shape[1:]
    if maps.shape[0] != b or height % gh or width % gw:
        raise ValueError(f"maps {tuple(maps.shape)} do not tile pixel_values {tuple(pixel_values.shape)}")
    patches = gh * gw
    steps = min(steps, patches)
    # rank[i, p]: how many patches of image i go before patch p.
    rank = maps.flatten(1).argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    curve = []
    for step in range(steps + 1):
        kept = (rank >= round(step * patches / steps)).reshape(b, 1, gh, gw).to(pixel_values.dtype)
        kept = kept.repeat_interleave(height // gh, dim=2).repeat_interleave(width // gw, dim=3)
        probabilities = model(pixel_values * kept).float().softmax(dim=1)
        curve.append(probabilities.gather(1, targets[:, None])[:, 0])
    return torch.stack(curve, dim=1)


def area_under_curve(curve: Tensor) -> Tensor:
    """Trapezoidal area [B] under curves [B, K + 1] sampled evenly over x in [0, 1]."""
    return torch.trapezoid(curve, dx=1 / (curve.shape[1] - 1), dim=1)


def deletion_scores(model: Callable[[Tensor], Tensor], pixel_values: Tensor, maps: Tensor, targets: Tensor,
                    steps: int = DELETION_STEPS, random_orders: int = RANDOM_ORDERS, seed: int = 0) -> dict[str, float]:
    """The deletion AUC averaged over the images, in attribution order and in `random_orders` seeded random
    orders (lower is more faithful), and how much lower the first is than the second:
    {"deletion_auc", "deletion_auc_random", "deletion_auc_gap"}."""
    auc = area_under_curve(deletion_curve(model, pixel_values, maps, targets, steps)).mean().item()
    generator = torch.Generator().manual_seed(seed)
    random_maps = [torch.rand(maps.shape, generator=generator).to(maps.device) for _ in range(random_orders)]
    auc_random = sum(area_under_curve(deletion_curve(model, pixel_values, random_map, targets, steps)).mean().item()
                     for random_map in random_maps) / random_orders
    return {"deletion_auc": auc, "deletion_auc_random": auc_random, "deletion_auc_gap": auc_random - auc}

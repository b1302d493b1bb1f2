"""Drawing explanations: heatmap overlays, a grid of them, and a Markdown report of a grid."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor


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


def rollout_markdown(title: str, result: dict, png_uri: str) -> str:
    """A Markdown report of a `rollout_grid` result whose PNG lies at `png_uri`."""
    rows = [f"| `{image['path']}` | {image['true']} | {image['pred']} | {image['prob']:.3f} |"
            for image in result["images"]]
    return "\n".join([
        f"# {title}",
        "",
        f"{result['misclassified']} of {len(result['images'])} images misclassified "
        f"(misclassified first). Grid: [{Path(png_uri).name}]({png_uri})",
        "",
        "| image | true | predicted | probability |",
        "|---|---|---|---|",
        *rows,
    ])

"""Drawing explanations: each image beside its heatmap overlay with a colour scale, and a Markdown report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, SubFigure
from PIL import Image

TILE_INCHES = (6.4, 3.4)  # one image and its overlay, side by side, with the colour bar and the titles
HEAT_CMAP = "jet"
HEAT_ALPHA = 0.5


def tile_title(true_label: str, pred_label: str, prob: float) -> str:
    """Title of one grid tile, e.g. 'true: cat / pred: dog (p=0.93)'."""
    return f"true: {true_label} / pred: {pred_label} (p={prob:.2f})"


def draw_tile(panel: Figure | SubFigure, image: Image.Image, patch_map: np.ndarray, title: str) -> None:
    """Draw into `panel` the image, the image under its patch map [gh, gw] (values in [0, 1], stretched
    bilinearly over the image) and the map's colour bar, under `title`."""
    original, overlay = panel.subplots(1, 2)
    original.imshow(image)
    original.set_title(f"model input ({image.width}×{image.height} px)", fontsize=9)
    overlay.imshow(image)
    heat = overlay.imshow(np.asarray(patch_map, dtype=np.float32), cmap=HEAT_CMAP, alpha=HEAT_ALPHA, vmin=0, vmax=1,
                          interpolation="bilinear", extent=(0, image.width, image.height, 0))
    overlay.set_title("heatmap", fontsize=9)
    for ax in (original, overlay):
        ax.set_axis_off()
    panel.colorbar(heat, ax=overlay, shrink=0.8).set_label("attribution (share of the peak)", fontsize=8)
    panel.suptitle(title, fontsize=10)


def explanation_figure(items: Sequence[dict], title: str | None = None, cols: int = 2, scale: float = 1.0) -> Figure:
    """A figure of `draw_tile` tiles, `cols` to a row, each `scale` times the standard size.

    Each item is a dict with `image` (PIL), `map` ([gh, gw]) and `title`.
    """
    if not items:
        raise ValueError("no items to draw")
    cols = min(cols, len(items))
    rows = math.ceil(len(items) / cols)
    width, height = TILE_INCHES
    fig = Figure(figsize=(width * cols * scale, height * rows * scale + (0.4 if title else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subfigures(rows, cols, squeeze=False).ravel()
    for panel, item in zip(panels, items, strict=False):
        draw_tile(panel, item["image"].convert("RGB"), item["map"], item["title"])
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG to `path` (its folder created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def rollout_markdown(title: str, result: dict, png_uri: str) -> str:
    """A Markdown report of a `rollout_grid` result whose PNG lies at `png_uri`."""
    rows = [f"| `{image['path']}` | {image['true']} | {image['pred']} | {image['prob']:.3f} |"
            for image in result["images"]]
    deletion = result["deletion"]
    return "\n".join([
        f"# {title}",
        "",
        f"{result['method'].capitalize()} rollout. {result['misclassified']} of {len(result['images'])} images "
        f"misclassified (misclassified first, classes taking turns). Grid: [{Path(png_uri).name}]({png_uri})",
        "",
        f"Deletion AUC (lower is more faithful): {deletion['deletion_auc']:.3f} in the map's order, "
        f"{deletion['deletion_auc_random']:.3f} in random order.",
        "",
        "| image | true | predicted | probability |",
        "|---|---|---|---|",
        *rows,
    ])

"""Explain predictions as patch heatmaps: a batch of pixels, a fixed choice of test images, or one image file.

`explain` gives plain attention rollout or, for a target class, gradient rollout; `rollout_grid` draws a
misclassified-first choice of test images as one PNG grid; `explain_image` explains a single image file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from vitflow.data.cache import SplitTensors
from vitflow.data.images import load_image, normalize
from vitflow.errors import VitflowError
from vitflow.explain.capture import capture_attentions
from vitflow.explain.figures import overlay_heatmap, save_overlay_grid
from vitflow.explain.rollout import HEAD_FUSIONS, attention_rollout, cls_patch_map, gradient_rollout
from vitflow.inference import predict_logits
from vitflow.models import ImageClassifier


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


def rollout_grid(
    model: ImageClassifier,
    test: SplitTensors,
    out_path: str | Path,
    count: int = 8,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    batch_size: int = 16,
) -> dict:
    """Predict `test`, explain a fixed choice of `count` images and draw them as one PNG grid.

    The choice: misclassified images first (up to count // 2, in path order), then correct ones (in
    path order), topped up with more misclassified ones when there are too few correct ones.
    Returns {"path", "images": [{"path", "true", "pred", "prob"}, ...], "misclassified",
    "seconds_per_image"} where the time is that of the rollout pass alone.
    """
    if count < 1:
        raise VitflowError(f"explain.images must be at least 1, got {count}")
    prob, pred = (values.tolist() for values in predict_logits(model, test.images, batch_size).softmax(1).max(1))
    true = test.labels.tolist()
    chosen = choose_images(test.paths, [p != t for p, t in zip(pred, true, strict=True)], count)

    start = time.perf_counter()
    maps = torch.cat([
        explain(model.model, normalize(test.images[batch], model.data_config), head_fusion, discard_ratio)[0]
        for batch in torch.tensor(chosen).split(batch_size)
    ])
    seconds_per_image = (time.perf_counter() - start) / len(chosen)

    images = [{"path": test.paths[i], "true": model.labels[true[i]], "pred": model.labels[pred[i]], "prob": prob[i]}
              for i in chosen]
    tiles = [{"image": Image.fromarray(test.images[i].permute(1, 2, 0).numpy()), "map": patch_map,
              "true_label": image["true"], "pred_label": image["pred"], "prob": image["prob"]}
             for i, patch_map, image in zip(chosen, maps, images, strict=True)]
    path = save_overlay_grid(tiles, out_path)
    return {"path": str(path), "images": images, "misclassified": sum(pred[i] != true[i] for i in chosen),
            "seconds_per_image": seconds_per_image}


def choose_images(paths: Sequence[str], wrong: Sequence[bool], count: int) -> list[int]:
    """Indices of min(count, N) images: misclassified first (up to count // 2), then correct, each in path order."""
    order = sorted(range(len(paths)), key=paths.__getitem__)
    misclassified = [i for i in order if wrong[i]]
    correct = [i for i in order if not wrong[i]]
    count = min(count, len(paths))
    take = min(len(misclassified), max(count // 2, count - len(correct)))
    return misclassified[:take] + correct[: count - take]


def explain_image(
    model: ImageClassifier,
    image_path: str | Path,
    out_path: str | Path,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    class_label: str | None = None,
) -> dict:
    """Explain one image file: write its overlay (as the model sees it) to `out_path` as PNG.

    Plain attention rollout, or gradient rollout towards `class_label` when given. Returns {"path",
    "predicted", "probability", "class"}: the predicted label and its probability, and the explained
    label (None for plain rollout, which explains no particular class).
    """
    target = None
    if class_label is not None:
        if class_label not in model.labels:
            raise VitflowError(f"class {class_label!r} is not a label of the model; choose one of: "
                               f"{', '.join(model.labels)}")
        target = model.labels.index(class_label)
    pixels = load_image(image_path, model.data_config)
    try:
        maps, logits = explain(model.model, normalize(pixels[None], model.data_config), head_fusion, discard_ratio,
                               target)
    except ValueError as error:  # a bad head fusion or discard ratio, said in the message
        raise VitflowError(f"cannot explain {image_path}: {error}") from None
    prob, pred = (value.item() for value in logits.softmax(1)[0].max(0))
    overlay = overlay_heatmap(Image.fromarray(pixels.permute(1, 2, 0).numpy()), maps[0])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    overlay.save(out_path, format="png")
    return {"path": str(out_path), "predicted": model.labels[pred], "probability": prob, "class": class_label}

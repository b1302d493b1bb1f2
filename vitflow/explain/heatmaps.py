"""Explain predictions as patch heatmaps: a batch of pixels, a fixed choice of test images, or one image file.

`explain` gives plain attention rollout or, for a target class, gradient rollout; `rollout_grid` draws a
misclassified-first choice of test images, classes taking turns, as one PNG grid and scores the maps with the
deletion metric; `explain_image` draws a single image file. Both run where the model's parameters are.
"""

from __future__ import annotations

import itertools
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
from vitflow.explain.faithfulness import deletion_scores
from vitflow.explain.figures import explanation_figure, save_figure, tile_title
from vitflow.explain.rollout import HEAD_FUSIONS, attention_rollout, cls_patch_map, gradient_rollout
from vitflow.inference import predict_logits
from vitflow.models import ImageClassifier

METHODS = ("gradient", "plain")  # gradient: class-specific rollout for the predicted (or a chosen) class


def explain(
    model: nn.Module,
    pixel_values: Tensor,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    target_class: int | Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Explain a batch [B, 3, H, W]: returns (patch maps [B, gh, gw] in [0, 1], logits [B, classes]).

    Plain attention rollout, or gradient rollout for `target_class` (one class, or a [B] tensor of one per
    image; it always fuses heads by mean).
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
    method: str = "gradient",
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    batch_size: int = 16,
) -> dict:
    """Predict `test`, explain a fixed choice of `count` images (`choose_images`) for their predicted class,
    draw them as one PNG grid and score the maps with the deletion metric.

    Returns {"path", "method", "images": [{"path", "true", "pred", "prob"}, ...], "misclassified",
    "seconds_per_image", "deletion": `deletion_scores`} where the time is that of the rollout pass alone.
    """
    _check_method(method)
    if count < 1:
        raise VitflowError(f"explain.images must be at least 1, got {count}")
    prob, pred = (values.tolist() for values in predict_logits(model, test.images, batch_size).softmax(1).max(1))
    true = test.labels.tolist()
    chosen = choose_images(test.paths, true, [p != t for p, t in zip(pred, true, strict=True)], count)

    device = next(model.parameters()).device
    pixels = normalize(test.images[chosen].to(device), model.data_config)
    targets = torch.tensor([pred[i] for i in chosen], device=device)
    start = time.perf_counter()
    maps = torch.cat([
        explain(model.model, pixels[i : i + batch_size], head_fusion, discard_ratio,
                targets[i : i + batch_size] if method == "gradient" else None)[0]
        for i in range(0, len(chosen), batch_size)
    ])
    seconds_per_image = (time.perf_counter() - start) / len(chosen)
    deletion = deletion_scores(model, pixels, maps, targets)

    images = [{"path": test.paths[i], "true": model.labels[true[i]], "pred": model.labels[pred[i]], "prob": prob[i]}
              for i in chosen]
    tiles = [{"image": Image.fromarray(test.images[i].permute(1, 2, 0).numpy()), "map": patch_map.cpu().numpy(),
              "title": tile_title(image["true"], image["pred"], image["prob"])}
             for i, patch_map, image in zip(chosen, maps, images, strict=True)]
    explained = "gradient rollout for the predicted class" if method == "gradient" else "plain attention rollout"
    title = (f"{explained}; deletion AUC {deletion['deletion_auc']:.3f} "
             f"(random order {deletion['deletion_auc_random']:.3f}, lower is more faithful)")
    path = save_figure(explanation_figure(tiles, title), out_path)
    return {"path": str(path), "method": method, "images": images,
            "misclassified": sum(pred[i] != true[i] for i in chosen), "seconds_per_image": seconds_per_image,
            "deletion": deletion}


def choose_images(paths: Sequence[str], labels: Sequence[int], wrong: Sequence[bool], count: int) -> list[int]:
    """Indices of min(count, N) images: misclassified ones first (up to count // 2, more when too few are
    correct), then correct ones; within each group the true classes take turns, each class in path order."""
    order = sorted(range(len(paths)), key=paths.__getitem__)
    misclassified = _classes_taking_turns([i for i in order if wrong[i]], labels)
    correct = _classes_taking_turns([i for i in order if not wrong[i]], labels)
    count = min(count, len(paths))
    take = min(len(misclassified), max(count // 2, count - len(correct)))
    return misclassified[:take] + correct[: count - take]


def _classes_taking_turns(indices: list[int], labels: Sequence[int]) -> list[int]:
    """`indices` reordered round-robin over their labels (lowest label first), each label's keeping its order."""
    by_label: dict[int, list[int]] = {}
    for i in indices:
        by_label.setdefault(labels[i], []).append(i)
    rounds = itertools.zip_longest(*(by_label[label] for label in sorted(by_label)))
    return [i for one_round in rounds for i in one_round if i is not None]


def explain_image(
    model: ImageClassifier,
    image_path: str | Path,
    out_path: str | Path,
    method: str = "gradient",
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    class_label: str | None = None,
) -> dict:
    """Explain one image file: write the image as the model sees it beside its heatmap and colour scale
    to `out_path` as PNG.

    Gradient rollout explains `class_label`, or the predicted class when it is None; plain rollout explains
    no particular class. Returns {"path", "predicted", "probability", "class"}: the predicted label and its
    probability, and the explained label (None for plain rollout).
    """
    _check_method(method)
    if class_label is not None and method != "gradient":
        raise VitflowError(f"class {class_label!r}: only gradient rollout explains a chosen class")
    if class_label is not None and class_label not in model.labels:
        raise VitflowError(f"class {class_label!r} is not a label of the model; choose one of: "
                           f"{', '.join(model.labels)}")
    pixels = load_image(image_path, model.data_config)
    prob, pred = (value.item() for value in predict_logits(model, pixels[None], 1)[0].softmax(0).max(0))
    target = None
    if method == "gradient":
        class_label = model.labels[pred] if class_label is None else class_label
        target = model.labels.index(class_label)
    batch = normalize(pixels[None].to(next(model.parameters()).device), model.data_config)
    try:
        maps, _ = explain(model.model, batch, head_fusion, discard_ratio, target)
    except ValueError as error:  # a bad head fusion or discard ratio, said in the message
        raise VitflowError(f"cannot explain {image_path}: {error}") from None
    explained = f"gradient rollout for {class_label}" if target is not None else "plain attention rollout"
    tile = {"image": Image.fromarray(pixels.permute(1, 2, 0).numpy()), "map": maps[0].cpu().numpy(),
            "title": f"{Path(image_path).name}: predicted {model.labels[pred]} (p={prob:.2f}); {explained}"}
    path = save_figure(explanation_figure([tile], cols=1, scale=1.6), out_path)
    return {"path": str(path), "predicted": model.labels[pred], "probability": prob, "class": class_label}


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise VitflowError(f"explain method {method!r}: use one of {', '.join(METHODS)}")

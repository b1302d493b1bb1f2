"""Prediction over many images: the files named by paths, folders and glob patterns, decoded and run a
batch at a time, ranked labels per image, written as CSV or JSON lines. Used by `vitflow predict` and,
for decoding and ranking, by the served model (`vitflow.serving`).
"""

from __future__ import annotations

import glob
import io
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from vitflow.data.images import resize_and_crop, to_rgb
from vitflow.data.sources.folder import IMAGE_SUFFIXES
from vitflow.errors import VitflowError
from vitflow.inference import predict_logits
from vitflow.models import DataConfig

BATCH_SIZE = 32
OUTPUT_SUFFIXES = (".csv", ".jsonl")
Ranking = dict[str, float]  # label -> probability, most probable first


def find_images(arguments: list[str]) -> tuple[list[Path], list[str]]:
    """(image files, "argument (why)" for each argument that named none) for files, folders and glob patterns.

    A file is taken as given; a folder is searched recursively and a pattern expanded (`**` spans folders),
    both keeping the files with an image suffix. Files come in argument order, each once.
    A VitflowError naming the arguments when there is no image file at all.
    """
    found, unmatched = {}, []
    for argument in arguments:
        path = Path(argument)
        if path.is_file():
            files = [path]
        else:
            candidates = path.rglob("*") if path.is_dir() else map(Path, glob.glob(argument, recursive=True))
            files = sorted(file for file in candidates if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file())
        if not files:
            unmatched.append(f"{argument} ({'no image files in it' if path.is_dir() else 'matches no image file'})")
        found.update(dict.fromkeys(files))
    if not found:
        raise VitflowError(f"no image files found in {' '.join(arguments)}; pass image files, folders or quoted "
                           "glob patterns such as 'shots/**/*.png'")
    return list(found), unmatched


def decode_image(source: Path | bytes, data_config: DataConfig) -> torch.Tensor:
    """An image file or its encoded bytes as uint8 [3, S, S]; a VitflowError saying why when it cannot be read."""
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
            return resize_and_crop(to_rgb(image), data_config)
    except UnidentifiedImageError:
        raise VitflowError("unknown image format") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise VitflowError(f"unreadable image: {type(error).__name__}: {error}") from None


def rank(probabilities: torch.Tensor, labels: list[str], top_k: int) -> list[Ranking]:
    """The `top_k` most probable labels of each row of `probabilities` [N, classes]."""
    top = probabilities.topk(min(top_k, len(labels)))
    return [{labels[index]: score for score, index in zip(scores, indices, strict=True)}
            for scores, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def predict_files(model: Callable[[torch.Tensor], torch.Tensor], paths: list[Path], top_k: int,
                  batch_size: int = BATCH_SIZE) -> tuple[list[tuple[Path, Ranking]], list[str]]:
    """([(path, ranking)] for the readable images, "path (why)" for the others) under `model`
    (an `ImageClassifier` or `ExportedModel`), decoding and running `batch_size` images at a time."""
    predictions, skipped = [], []
    with tqdm(total=len(paths), desc="predict", unit="image", disable=None, leave=False) as bar:
        for start in range(0, len(paths), batch_size):
            chunk, readable, images = paths[start:start + batch_size], [], []
            for path in chunk:
                try:
                    images.append(decode_image(path, model.data_config))
                    readable.append(path)
                except VitflowError as error:
                    skipped.append(f"{path} ({error})")
            if images:
                probabilities = predict_logits(model, torch.stack(images), batch_size).softmax(1)
                predictions += zip(readable, rank(probabilities, model.labels, top_k), strict=True)
            bar.update(len(chunk))
    return predictions, skipped


def write_predictions(predictions: list[tuple[Path, Ranking]], output: Path) -> None:
    """One row per image to `output` (.csv or .jsonl): path, label_1, probability_1, ..., label_k, probability_k."""
    records = [_record(path, ranking) for path, ranking in predictions]
    if output.suffix == ".csv":
        pd.DataFrame(records).to_csv(output, index=False)
    else:  # pandas' JSON writer escapes "/" and rounds to 10 digits
        output.write_text("".join(json.dumps(record) + "\n" for record in records))


def _record(path: Path, ranking: Ranking) -> dict:
    record = {"path": str(path)}
    for position, (label, probability) in enumerate(ranking.items(), 1):
        record |= {f"label_{position}": label, f"probability_{position}": probability}
    return record

"""Fine-tune a pretrained ViT under one strategy.

In: an `ImageClassifier` with a fresh head, the preprocessed train and val splits, a `ResolvedStrategy`.
Out: a `TrainResult` (per-epoch history, parameter counts, timings) and the fine-tuned model saved as
one ordinary checkpoint directory.

Under torchrun (`scripts/train_distributed.py`) the same `fine_tune` trains with torch distributed:
DDP shards the end-to-end batches, and rank 0 alone saves the model and result (see `distributed`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

from vitflow.config import ModelConfig, TrainConfig
from vitflow.data.cache import SplitTensors, load_split
from vitflow.data.images import augmentation, normalize
from vitflow.models import ImageClassifier, count_parameters, load_pretrained
from vitflow.training import distributed
from vitflow.training.schedule import warmup_cosine
from vitflow.training.strategies import ResolvedStrategy
from vitflow.training.validation import validate

RESULT_FILE = "result.json"
log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    strategy: str
    settings: dict  # what it trained with: `ResolvedStrategy.as_dict()`
    model_dir: str
    history: list[dict]  # one row per epoch: epoch, train_loss, val_loss, val_accuracy
    trainable_params: int
    total_params: int
    train_seconds: float
    images_per_second: float
    peak_rss_mb: float

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> TrainResult:
        return cls(**json.loads(path.read_text()))


def set_trainable(model: ImageClassifier, resolved: ResolvedStrategy) -> tuple[int, int]:
    """Freeze what the strategy keeps fixed; return (trainable, total) parameter counts."""
    modules = resolved.strategy.trainable_modules(model, resolved.options)
    for parameter in model.parameters():
        parameter.requires_grad = modules is None
    for module in modules or []:
        for parameter in module.parameters():
            parameter.requires_grad = True
    return count_parameters(model)


def fine_tune(model: ImageClassifier, train: SplitTensors, val: SplitTensors, resolved: ResolvedStrategy,
              out_dir: Path | str, progress: bool = True) -> TrainResult:
    """Train `model` under `resolved`, save it to `out_dir/model`, and return what happened.

    Under torchrun: moves `model` to this rank's device and returns the same result on every rank.
    """
    out_dir, settings = Path(out_dir), resolved.settings
    device = distributed.setup()
    if device is not None:
        model.to(device)
    torch.manual_seed(settings.seed)
    resolved.strategy.prepare(model, resolved.options)
    trainable, total = set_trainable(model, resolved)
    start = time.perf_counter()
    fit = resolved.strategy.fit or train_end_to_end
    history, images_seen = fit(model, train, val, settings, resolved.options, progress)
    seconds = time.perf_counter() - start
    resolved.strategy.finish(model, resolved.options)
    result = TrainResult(strategy=resolved.name, settings=resolved.as_dict(), model_dir=str(out_dir / "model"),
                         history=history,
                         trainable_params=trainable, total_params=total, train_seconds=round(seconds, 2),
                         images_per_second=round(images_seen / seconds, 2),
                         peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    if distributed.is_main():
        model.save(out_dir / "model")
        result.save(out_dir / RESULT_FILE)
    return result


def train_end_to_end(model: ImageClassifier, train: SplitTensors, val: SplitTensors, settings: TrainConfig,
                     options, progress: bool) -> tuple[list[dict], int]:
    """AdamW on the trainable parameters (backbone at lr_backbone, head at lr_head), warm-up then cosine.

    Under torchrun: DDP averages gradients, each rank trains on its share of every epoch's batches.
    """
    device = next(model.parameters()).device
    net = distributed.wrap(model)
    if distributed.world_size() > 1:
        torch.manual_seed(settings.seed + distributed.rank())  # each rank draws its own augmentations
    head_ids = {id(p) for p in model.head.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in trainable if id(p) not in head_ids], "lr": settings.lr_backbone},
        {"params": [p for p in trainable if id(p) in head_ids], "lr": settings.lr_head},
    ], weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train.labels) / (settings.batch_size * distributed.world_size()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(steps_per_epoch * settings.epochs, settings.warmup_ratio))
    augment = augmentation(model.data_config, settings.crop_scale_min) if settings.augment else None
    history = []
    for epoch in range(1, settings.epochs + 1):
        model.train()
        losses = []
        batches = distributed.shard_batches(len(train.labels), settings.batch_size, settings.seed, epoch)
        for indices in tqdm(batches, desc=f"epoch {epoch}/{settings.epochs}", disable=not progress, leave=False):
            images = train.images[indices]
            if augment is not None:
                images = torch.stack([augment(image) for image in images])
            loss = F.cross_entropy(net(normalize(images.to(device), model.data_config)),
                                   train.labels[indices].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        history.append({"epoch": epoch, "train_loss": distributed.average(sum(losses) / len(losses), device),
                        **validate(model, val, settings.batch_size)})
    return history, len(train.labels) * settings.epochs


def train_from_cache(model: ModelConfig, labels: list[str], image_size: int | None, cache_dir: Path | str,
                     resolved: ResolvedStrategy, out_dir: Path | str, progress: bool = True) -> TrainResult:
    """Load the pretrained model with a new head for `labels` and fine-tune it on the cache's train/val splits."""
    torch.manual_seed(resolved.settings.seed)  # the new head's initialisation
    classifier = load_pretrained(model, labels, image_size)
    return fine_tune(classifier, load_split(cache_dir, "train"), load_split(cache_dir, "val"), resolved, out_dir,
                     progress=progress)


def train_or_reuse(model: ModelConfig, labels: list[str], image_size: int | None, cache_dir: Path | str,
                   resolved: ResolvedStrategy, out_dir: Path | str, progress: bool = True) -> TrainResult:
    """The finished training in `out_dir` (named by a fingerprint of data, settings and code), or a new one.

    A new training is written to a temporary folder beside `out_dir` and renamed into place when complete,
    so a kill leaves no half-written model where a later run would reuse it; a broken `out_dir` is removed
    and trained again.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        finished = finished_training(out_dir)
        if finished is not None:
            return finished
        log.warning("%s: incomplete or broken training output; removed, training again", out_dir)
        shutil.rmtree(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    result = train_from_cache(model, labels, image_size, cache_dir, resolved, staging, progress)
    result.model_dir = str(out_dir / "model")
    result.save(staging / RESULT_FILE)
    staging.rename(out_dir)
    return result


def finished_training(out_dir: Path) -> TrainResult | None:
    """The result in `out_dir` when it and the model it names are complete and readable, else None."""
    try:
        result = TrainResult.load(out_dir / RESULT_FILE)
        weights = list(Path(result.model_dir).glob("*.safetensors"))
        for file in weights:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
    except Exception:  # a missing or truncated file, bad JSON, an old result format: all mean "train again"
        return None
    return result if weights and Path(result.model_dir).parent == out_dir else None

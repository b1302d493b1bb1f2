"""Fine-tune a pretrained ViT under one strategy: full, partial or feature extraction.

In: an `ImageClassifier` with a fresh head, the preprocessed train and val splits, `TrainSettings`.
Out: a `TrainResult` (per-epoch history, parameter counts, timings) and the fine-tuned
model saved as one ordinary checkpoint directory.

Under torchrun (`scripts/train_distributed.py`) the same `fine_tune` trains with torch distributed:
DDP shards the end-to-end strategies' batches, feature extraction shares out the backbone pass,
and rank 0 alone saves the model and result (see `tasks.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from prefect import task
from prefect.context import TaskRunContext
from tqdm import tqdm

from tasks import distributed
from tasks.preprocess import SplitTensors, load_split
from vitflow.errors import VitflowError
from vitflow.images import augmentation, normalize
from vitflow.models import ImageClassifier, count_parameters, load_model
from vitflow.tracking import source_hash

STRATEGIES = ("full", "partial", "feature_extraction")
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr_backbone: float
    lr_head: float
    weight_decay: float
    warmup_ratio: float
    partial_blocks: int
    feature_extraction_epochs: int
    seed: int
    augment: bool
    crop_scale_min: float

    @classmethod
    def from_params(cls, params: dict) -> TrainSettings:
        train, preprocess = params["train"], params["preprocess"]
        return cls(epochs=int(train["epochs"]), batch_size=int(train["batch_size"]),
                   lr_backbone=float(train["lr_backbone"]), lr_head=float(train["lr_head"]),
                   weight_decay=float(train["weight_decay"]), warmup_ratio=float(train["warmup_ratio"]),
                   partial_blocks=int(train["partial_blocks"]),
                   feature_extraction_epochs=int(train["feature_extraction_epochs"]), seed=int(train["seed"]),
                   augment=bool(preprocess["augment"]), crop_scale_min=float(preprocess["crop_scale_min"]))


@dataclass
class TrainResult:
    strategy: str
    model_dir: str
    history: list[dict]  # one row per epoch: epoch, train_loss, val_loss, val_accuracy
    trainable_params: int
    total_params: int
    train_seconds: float
    images_per_second: float
    peak_rss_mb: float

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


def set_trainable(model: ImageClassifier, strategy: str, partial_blocks: int) -> tuple[int, int]:
    """Freeze what `strategy` keeps fixed; return (trainable, total) parameter counts."""
    if strategy not in STRATEGIES:
        raise VitflowError(f"train.strategies: unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    train_all = strategy == "full"
    for parameter in model.parameters():
        parameter.requires_grad = train_all
    trained_modules = [model.head]
    if strategy == "partial":
        if not 1 <= partial_blocks <= len(model.blocks):
            raise VitflowError(f"train.partial_blocks={partial_blocks}: must be between 1 and {len(model.blocks)}")
        trained_modules += [*model.blocks[-partial_blocks:], model.final_norm]
    for module in trained_modules:
        for parameter in module.parameters():
            parameter.requires_grad = True
    return count_parameters(model)


def warmup_cosine(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warm-up over the first `warmup_ratio` of steps, then cosine decay to 0."""
    warmup_steps = max(1, round(total_steps * warmup_ratio))

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def fine_tune(model: ImageClassifier, train: SplitTensors, val: SplitTensors, strategy: str,
              settings: TrainSettings, out_dir: Path | str, progress: bool = True) -> TrainResult:
    """Train `model` under `strategy`, save it to `out_dir/model`, and return what happened.

    Under torchrun: moves `model` to this rank's device and returns the same result on every rank.
    """
    out_dir = Path(out_dir)
    device = distributed.setup()
    if device is not None:
        model.to(device)
    torch.manual_seed(settings.seed)
    trainable, total = set_trainable(model, strategy, settings.partial_blocks)
    start = time.perf_counter()
    if strategy == "feature_extraction":
        history = _train_head_on_features(model, train, val, settings, progress)
        images_seen = len(train.labels)  # the backbone sees each image once
    else:
        history = _train_end_to_end(model, train, val, settings, progress)
        images_seen = len(train.labels) * settings.epochs
    seconds = time.perf_counter() - start
    result = TrainResult(strategy=strategy, model_dir=str(out_dir / "model"), history=history,
                         trainable_params=trainable, total_params=total, train_seconds=round(seconds, 2),
                         images_per_second=round(images_seen / seconds, 2),
                         peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    if distributed.is_main():
        model.save(out_dir / "model")
        result.save(out_dir / RESULT_FILE)
    return result


def _train_end_to_end(model: ImageClassifier, train: SplitTensors, val: SplitTensors, settings: TrainSettings,
                      progress: bool) -> list[dict]:
    """Under torchrun: DDP averages gradients, each rank trains on its share of every epoch's batches."""
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
                        **_validate(model, val, settings)})
    return history


def _train_head_on_features(model: ImageClassifier, train: SplitTensors, val: SplitTensors,
                            settings: TrainSettings, progress: bool) -> list[dict]:
    """Under torchrun: each rank extracts a share of the features, then every rank trains the same head on all."""
    def features(images: torch.Tensor) -> torch.Tensor:
        return extract_features(model, images, settings.batch_size, progress)

    train_features = distributed.gather_rows(features, train.images)
    val_features = distributed.gather_rows(features, val.images)
    train_labels, val_labels = train.labels.to(train_features.device), val.labels.to(val_features.device)
    head = model.head
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr_head, weight_decay=settings.weight_decay)
    epochs = settings.feature_extraction_epochs
    steps_per_epoch = math.ceil(len(train.labels) / settings.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps_per_epoch * epochs,
                                                                           settings.warmup_ratio))
    history = []
    for epoch in range(1, epochs + 1):
        head.train()
        losses = []
        for indices in torch.randperm(len(train.labels)).split(settings.batch_size):
            loss = F.cross_entropy(head(train_features[indices]), train_labels[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        head.eval()
        with torch.no_grad():
            val_logits = head(val_features)
        history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses),
                        **_val_metrics(val_logits, val_labels)})
    return history


@torch.no_grad()
def extract_features(model: ImageClassifier, images: torch.Tensor, batch_size: int, progress: bool) -> torch.Tensor:
    """Backbone features for uint8 images, computed once with the backbone in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    chunks = images.split(batch_size)
    return torch.cat([model.forward_features(normalize(chunk.to(device), model.data_config))
                      for chunk in tqdm(chunks, desc="features", disable=not progress, leave=False)])


@torch.no_grad()
def _validate(model: ImageClassifier, val: SplitTensors, settings: TrainSettings) -> dict:
    model.eval()
    device = next(model.parameters()).device

    def logits(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(normalize(chunk.to(device), model.data_config))
                          for chunk in images.split(settings.batch_size)])

    return _val_metrics(distributed.gather_rows(logits, val.images), val.labels.to(device))


def _val_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    return {"val_loss": F.cross_entropy(logits, labels).item(),
            "val_accuracy": (logits.argmax(1) == labels).float().mean().item()}


def output_dir(work_dir: Path | str, cache_file: str, model_source: str, image_size: int | None,
               settings: TrainSettings, strategy: str) -> Path:
    """Where a training's outputs go: named by data and preprocessing (the cache file), model, settings and code."""
    fingerprint = json.dumps([Path(cache_file).stem, model_source, image_size, asdict(settings), code_version()])
    return Path(work_dir) / "models" / hashlib.sha256(fingerprint.encode()).hexdigest()[:16] / strategy


def code_version() -> str:
    """Hash of the source files that decide what training produces (part of the cache key)."""
    return source_hash(["vitflow/models.py", "vitflow/images.py", "tasks/preprocess.py", "tasks/train.py",
                        "tasks/distributed.py"])


def _training_cache_key(context: TaskRunContext, parameters: dict) -> str:
    """The output directory's fingerprint and strategy: the same data, params and code reuse the result.

    Results and models both live under the work directory (.vitflow/), so removing it clears both.
    """
    out_dir = Path(parameters["out_dir"])
    return f"fine-tune-{out_dir.parent.name}-{out_dir.name}"


@task(name="fine-tune", cache_key_fn=_training_cache_key, persist_result=True)
def fine_tune_task(model_source: str, labels: list[str], image_size: int | None, cache_file: str, strategy: str,
                   settings: TrainSettings, out_dir: str, trust_remote_code: bool = False) -> TrainResult:
    """`out_dir` is named by a fingerprint of data version, params and code, never by run ids."""
    return train_from_cache(model_source, labels, image_size, cache_file, strategy, settings, out_dir,
                            trust_remote_code)


def train_from_cache(model_source: str, labels: list[str], image_size: int | None, cache_file: Path | str,
                     strategy: str, settings: TrainSettings, out_dir: Path | str, trust_remote_code: bool = False,
                     progress: bool = True) -> TrainResult:
    """Load the pretrained model with a new head for `labels` and fine-tune it on the cache's train/val splits."""
    torch.manual_seed(settings.seed)  # the new head's initialisation
    model = load_model(model_source, labels=labels, image_size=image_size, trust_remote_code=trust_remote_code)
    return fine_tune(model, load_split(cache_file, "train"), load_split(cache_file, "val"), strategy, settings,
                     out_dir, progress=progress)

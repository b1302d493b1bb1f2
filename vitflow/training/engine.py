"""What a training runs on and with: the Accelerate `Accelerator` (device, mixed precision, processes), how the
model computes while it trains (attention kernel, patch dropout), the batches streamed from the memory-mapped
cache, the optimizer's parameter groups, and the per-epoch checkpoint a killed training resumes from.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from vitflow.config import TrainConfig
from vitflow.data.cache import SplitTensors, worker_processes
from vitflow.data.images import augmentation
from vitflow.devices import resolve_attention, resolve_device, resolve_precision
from vitflow.models import ImageClassifier

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def make_accelerator(settings: TrainConfig) -> Accelerator:
    """An Accelerator for `train.device` and `train.precision`: under `accelerate launch` one process per GPU
    (or CPU share) with DDP, else this process alone.

    Accelerate keeps one state per process; a training with another device or precision than the last
    (tests, a strategy section overriding them) resets it first. `static_graph`: a trainable parameter may
    never be used (DINOv2's mask token under `full`), which plain DDP would wait for.
    """
    device = resolve_device(settings.device)
    mixed = MIXED_PRECISION[resolve_precision(settings.precision, device)]
    state = AcceleratorState._shared_state
    if state and (state.get("_mixed_precision") != mixed or state["device"].type != device.type):
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed,
                       kwargs_handlers=[DistributedDataParallelKwargs(static_graph=True)])


class TrainingObserver:
    """Told what happens while a model trains, as it happens (e.g. to log it live); by default nothing.
    Only the main process is told."""

    def step(self, step: int, values: dict[str, float]) -> None:
        """After optimizer update `step` (1, 2, ...): train_loss and the learning rates (lr_head, lr_backbone
        for the top block where the backbone trains)."""

    def epoch(self, row: dict) -> None:
        """After each epoch: its history row (epoch, train_loss, val_loss, val_accuracy)."""


def precision_of(accelerator: Accelerator) -> str:
    return {value: key for key, value in MIXED_PRECISION.items()}[accelerator.mixed_precision]


@contextmanager
def training_computation(model: ImageClassifier, settings: TrainConfig, accelerator: Accelerator) -> Iterator[str]:
    """Within it `model` computes as training should: with `train.attention`'s kernel (yielded) and
    `train.patch_dropout`. After it, the model's own kernel and every patch again, for saving, evaluation and
    rollout."""
    own_kernel = model.attention_kernel
    kernel = resolve_attention(settings.attention, accelerator.device, precision_of(accelerator)) or own_kernel
    model.set_attention(kernel)
    model.set_patch_dropout(settings.patch_dropout)
    try:
        yield kernel
    finally:
        model.set_attention(own_kernel)
        model.set_patch_dropout(0.0)


class TrainingImages(Dataset):
    """Sample i of a cached split: (uint8 image [3, S, S], label), read from the memory-mapped cache and, when
    `augment` is given, randomly cropped and flipped (in the DataLoader's workers when it has any)."""

    def __init__(self, split: SplitTensors, augment: torch.nn.Module | None):
        self.split, self.augment = split, augment

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.split.images[index]
        return (self.augment(image) if self.augment is not None else image.clone()), self.split.labels[index]


def loader_workers(settings: TrainConfig, device: torch.device) -> int:
    """`train.loader_workers`, or when unset: none on a CPU, up to 4 beside a GPU.

    On a CPU the training's own threads already use every core: a worker only competes with them, and one
    forked each epoch makes the training process copy every page it then writes (2.3 s an epoch for ViT-S).
    Beside a GPU, workers crop and flip the next batches while it computes.
    """
    if settings.loader_workers is not None:
        return settings.loader_workers
    return 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)


def training_batches(model: ImageClassifier, train: SplitTensors, settings: TrainConfig,
                     device: torch.device) -> tuple[DataLoader, torch.Generator]:
    """Shuffled batches of `train` and the generator that orders them (seed it per epoch for a resumable order:
    worker seeds are drawn from it too)."""
    augment = augmentation(model.data_config, settings.crop_scale_min) if settings.augment else None
    generator = torch.Generator()
    loader = DataLoader(TrainingImages(train, augment), batch_size=settings.batch_size, shuffle=True,
                        generator=generator, num_workers=worker_processes(loader_workers(settings, device)),
                        pin_memory=device.type == "cuda")
    return loader, generator


def parameter_groups(model: ImageClassifier, settings: TrainConfig) -> list[dict]:
    """AdamW groups of the trainable parameters: the head at lr_head; the backbone at lr_backbone, scaled by
    layer_decay once per block between a parameter and the top (embeddings deepest); no weight decay on
    biases, norms and tokens (1-D or smaller)."""
    depth = len(model.blocks)
    layer = {id(p): index + 1 for index, block in enumerate(model.blocks) for p in block.parameters()}
    layer |= {id(p): depth + 1 for module in (model.final_norm, model.head) for p in module.parameters()}
    head = {id(p) for p in model.head.parameters()}
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        lr = settings.lr_head if id(parameter) in head else (
            settings.lr_backbone * settings.layer_decay ** (depth + 1 - layer.get(id(parameter), 0)))
        decay = settings.weight_decay if parameter.ndim > 1 else 0.0
        groups.setdefault((lr, decay), []).append(parameter)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


@dataclass
class Progress:
    """Where a training stands after an epoch: its history and its best epoch so far."""

    best_by: str = "val_loss"  # `train.best_by`
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def epoch(self) -> int:
        return len(self.history)

    def record(self, row: dict, model: torch.nn.Module) -> None:
        """Add an epoch's row; when it is the best yet (by `best_by`), keep its trainable weights (on the CPU) to be
        restored at the end."""
        self.history.append(row)
        best = self.history[self.best_epoch - 1] if self.best_epoch else None
        if best is None or self.score(row) > self.score(best):
            self.best_epoch = row["epoch"]
            self.best_weights = trainable_state(model)

    def score(self, row: dict) -> tuple[float, ...]:
        """Higher is better: the val loss, lowest first, or the val accuracy with ties broken by the loss."""
        if self.best_by == "val_loss":
            return (-row["val_loss"],)
        return row["val_accuracy"], -row["val_loss"]

    def epochs_since_best(self) -> int:
        return self.epoch - self.best_epoch


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def restore_best(model: torch.nn.Module, progress: Progress) -> None:
    """Put the best epoch's trainable weights back into `model`."""
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in progress.best_weights.items():
            parameters[name].copy_(value)


class Checkpoint:
    """The state after the last finished epoch, in `directory`: Accelerate's state (model, optimizer, the
    registered scheduler, RNG states), the best weights, the history and which parameters train.

    Written to a temporary folder and renamed, so a kill mid-write leaves the previous epoch's checkpoint.
    """

    def __init__(self, directory: Path | None):
        self.directory = directory

    def save(self, accelerator: Accelerator, model: torch.nn.Module, progress: Progress) -> None:
        if self.directory is None:
            return
        staging = self.directory.with_name(f"{self.directory.name}.partial")
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging), safe_serialization=True)
        if accelerator.is_main_process:
            save_file(progress.best_weights, staging / "best.safetensors")
            trainable = sorted(trainable_state(model))
            (staging / "progress.json").write_text(json.dumps(
                {"history": progress.history, "best_epoch": progress.best_epoch, "trainable": trainable}))
            shutil.rmtree(self.directory, ignore_errors=True)
            staging.rename(self.directory)
        accelerator.wait_for_everyone()

    def resume(self, accelerator: Accelerator, model: torch.nn.Module, best_by: str) -> Progress:
        """The progress of the checkpoint, with its state loaded; a fresh Progress (choosing its best epoch by
        `best_by`) when there is none or it trained other parameters (then it is removed)."""
        saved = self.directory / "progress.json" if self.directory else None
        if saved is None or not saved.is_file():
            return Progress(best_by)
        meta = json.loads(saved.read_text())
        if meta["trainable"] != sorted(trainable_state(model)):
            shutil.rmtree(self.directory, ignore_errors=True)
            return Progress(best_by)
        accelerator.load_state(str(self.directory))
        progress = Progress(best_by, meta["history"], meta["best_epoch"])
        progress.best_weights = load_file(self.directory / "best.safetensors")
        return progress

    def remove(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

"""`feature_extraction`: the backbone stays frozen; its features are computed once and a linear head trains on them.

Under `accelerate launch` every process computes all features and trains the same head (seeded alike):
the features are the expensive part and are cheap next to end-to-end training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from vitflow.inference import batched
from vitflow.training.engine import Progress, restore_best
from vitflow.training.strategies.base import Strategy
from vitflow.training.validation import validation_metrics


class FeatureExtraction(Strategy):
    name = "feature_extraction"
    ignores = frozenset({"lr_backbone", "layer_decay", "augment", "crop_scale_min", "grad_accumulation",
                         "loader_workers", "patch_dropout"})

    def trainable_modules(self, model, options):
        return [model.head]

    @staticmethod
    def fit(model, train, val, settings, options, run) -> tuple[Progress, int]:
        model.eval()
        accelerator = run.accelerator

        def features(images: torch.Tensor) -> torch.Tensor:
            with accelerator.autocast():
                return batched(model.forward_features, images, model.data_config, settings.batch_size,
                               device=accelerator.device, progress="features" if run.progress else None).float()

        train_features, val_features = features(train.images), features(val.images)
        train_labels, val_labels = train.labels.to(accelerator.device), val.labels.to(accelerator.device)
        head = model.head
        optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr_head, weight_decay=settings.weight_decay)
        updates = math.ceil(len(train.labels) / settings.batch_size) * settings.epochs
        scheduler = get_cosine_schedule_with_warmup(optimizer, round(updates * settings.warmup_ratio), updates)
        state = Progress(settings.best_by)
        for epoch in range(1, settings.epochs + 1):
            patience = settings.early_stopping_patience
            if patience is not None and state.epoch and state.epochs_since_best() >= patience:
                break
            head.train()
            losses = []
            for indices in torch.randperm(len(train.labels)).split(settings.batch_size):
                loss = F.cross_entropy(model.forward_head(train_features[indices]), train_labels[indices],
                                       label_smoothing=settings.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(head.parameters(), settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                run.observe_step(scheduler.last_epoch,
                                 {"train_loss": loss.item(), "lr_head": scheduler.get_last_lr()[0]})
            head.eval()
            with torch.no_grad():
                val_logits = model.forward_head(val_features)
            state.record({"epoch": epoch, "train_loss": sum(losses) / len(losses),
                          **validation_metrics(val_logits, val_labels)}, model)
            run.observe_epoch(state.history[-1])
        restore_best(model, state)
        return state, len(train.labels)  # the backbone sees each image once

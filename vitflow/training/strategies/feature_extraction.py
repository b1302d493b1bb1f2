"""`feature_extraction`: the backbone stays frozen; its features are computed once and a linear head trains on them.

Under torchrun each rank extracts a share of the features, then every rank trains the same head on all of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vitflow.inference import batched
from vitflow.training import distributed
from vitflow.training.schedule import warmup_cosine
from vitflow.training.strategies.base import Strategy
from vitflow.training.validation import validation_metrics


class FeatureExtraction(Strategy):
    name = "feature_extraction"

    def trainable_modules(self, model, options):
        return [model.head]

    @staticmethod
    def fit(model, train, val, settings, options, progress: bool) -> tuple[list[dict], int]:
        model.eval()

        def features(images: torch.Tensor) -> torch.Tensor:
            return batched(model.forward_features, images, model.data_config, settings.batch_size,
                           device=next(model.parameters()).device, progress="features" if progress else None)

        train_features = distributed.gather_rows(features, train.images)
        val_features = distributed.gather_rows(features, val.images)
        train_labels, val_labels = train.labels.to(train_features.device), val.labels.to(val_features.device)
        head = model.head
        optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr_head, weight_decay=settings.weight_decay)
        steps_per_epoch = math.ceil(len(train.labels) / settings.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(steps_per_epoch * settings.epochs, settings.warmup_ratio))
        history = []
        for epoch in range(1, settings.epochs + 1):
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
                            **validation_metrics(val_logits, val_labels)})
        return history, len(train.labels)  # the backbone sees each image once


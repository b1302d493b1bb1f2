"""What a fine-tuning strategy is: which parameters train, and optionally a fit of its own.

A strategy is one module with a `Strategy` subclass, registered by name in `strategies/__init__.py`.
Its own settings (`Options`) come from the `train.<name>` section of params.yaml, which may also
override the shared `train.*` settings for that strategy alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

if TYPE_CHECKING:
    from vitflow.models import ImageClassifier


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# fit(model, train, val, settings, options, run: loop.FitRun) -> (engine.Progress, images the backbone saw)
Fit = Callable[..., tuple[object, int]]


class Strategy:
    """The default is end-to-end training (see `vitflow.training.loop`) of `trainable_modules`."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    ignores: ClassVar[frozenset[str]] = frozenset()  # shared train.* settings it never reads (not logged)

    def prepare(self, model: ImageClassifier, options: BaseModel) -> None:
        """Change the model before training (e.g. insert adapters); by default nothing."""

    def trainable_modules(self, model: ImageClassifier, options: BaseModel) -> list[nn.Module] | None:
        """The modules whose parameters train (after `prepare`); None: every parameter."""
        return None

    def finish(self, model: ImageClassifier, options: BaseModel) -> None:
        """Before the model is saved, return it to its library's ordinary form (e.g. merge adapters into the
        weights they adapt), so that it saves and loads like any checkpoint; by default nothing."""

    fit: Fit | None = None  # a strategy that trains differently (e.g. on cached features) sets its own

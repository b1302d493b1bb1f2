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


# fit(model, train, val, settings, options, progress) -> (history, images the backbone saw)
Fit = Callable[..., tuple[list[dict], int]]


class Strategy:
    """The default is end-to-end training (see `vitflow.training.loop`) of `trainable_modules`."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions

    def trainable_modules(self, model: ImageClassifier, options: BaseModel) -> list[nn.Module] | None:
        """The modules whose parameters train; None: every parameter."""
        return None

    fit: Fit | None = None  # a strategy that trains differently (e.g. on cached features) sets its own

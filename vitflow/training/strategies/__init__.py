"""The strategy registry: a new strategy is one module and one line in `STRATEGIES`.

`resolve(train, name)` gives what a strategy trains with: the shared `train.*` settings with the
`train.<name>` section's overrides applied, and the strategy's own options from that section.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from vitflow.config import TrainConfig, describe_error
from vitflow.errors import VitflowError
from vitflow.training.strategies.base import Strategy
from vitflow.training.strategies.feature_extraction import FeatureExtraction
from vitflow.training.strategies.full import Full
from vitflow.training.strategies.lora import Lora
from vitflow.training.strategies.partial import Partial

STRATEGIES: dict[str, Strategy] = {strategy.name: strategy for strategy in (
    Full(),
    Partial(),
    FeatureExtraction(),
    Lora(),
)}


@dataclass(frozen=True)
class ResolvedStrategy:
    strategy: Strategy
    settings: TrainConfig  # the shared settings, with this strategy's overrides
    options: BaseModel  # the strategy's own settings

    @property
    def name(self) -> str:
        return self.strategy.name

    def as_dict(self) -> dict:
        """Everything this strategy trains with, as plain data (for fingerprints and MLflow params)."""
        shared = {key: value for key, value in self.settings.shared().items() if key not in self.strategy.ignores}
        return {"strategy": self.name, **shared, self.name: self.options.model_dump(mode="json")}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise VitflowError(f"train.strategies: unknown strategy {name!r}; use one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def resolve(train: TrainConfig, name: str, source: str = "params.yaml") -> ResolvedStrategy:
    """The strategy `name` with its settings; a bad `train.<name>` setting is one line naming it."""
    strategy = get_strategy(name)
    section, shared_names = train.strategy_section(name), train.shared()
    shared = {key: value for key, value in section.items() if key in shared_names}
    own = {key: value for key, value in section.items() if key not in shared}
    try:
        settings = TrainConfig.model_validate({**train.model_dump(exclude=set(train.model_extra or {})), **shared})
        options = strategy.Options.model_validate(own)
    except ValidationError as error:
        raise VitflowError(describe_error(error, source, prefix=f"train.{name}.")) from None
    return ResolvedStrategy(strategy, settings, options)


def check_train_config(train: TrainConfig, source: str = "params.yaml") -> list[ResolvedStrategy]:
    """Check the strategy list and every per-strategy section before any work; returns the strategies to run."""
    for key, value in (train.model_extra or {}).items():
        if key not in STRATEGIES:
            raise VitflowError(f"{source}: unknown setting 'train.{key}'; a shared setting is one of "
                               f"{', '.join(train.shared())}, a section is a strategy ({', '.join(STRATEGIES)})")
        if not isinstance(value, dict):
            raise VitflowError(f"{source}: train.{key} must be a section of settings for strategy {key}")
    if len(set(train.strategies)) != len(train.strategies):
        raise VitflowError(f"{source}: train.strategies={train.strategies} names a strategy twice")
    return [resolve(train, name, source) for name in train.strategies]

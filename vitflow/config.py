"""The one config: `params.yaml`, loaded once into typed sections and checked on load.

    config = load_config("params.yaml", ["train.epochs=3", "train.partial.blocks=4"])
    config.train.epochs, config.data.path, config.as_dict()

Overrides are dotted keys whose values are parsed as YAML. An unknown key, a wrong type or an
out-of-range value is a `VitflowError` naming the file, the key and what is allowed, raised before any
work starts. The Prefect flow, the CLI and the DVC stages all read it; tasks receive the sections they need.

`train` holds the settings every strategy shares; a section named after a strategy (`train.partial`)
holds that strategy's own settings and may override shared ones for it alone (see `vitflow.training`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from vitflow.errors import VitflowError
from vitflow.paths import PARAMS_FILE


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FoundationConfig(Section):
    output: str = Field(min_length=1, description="the rebuilt DINOv2-small checkpoint directory")
    tolerance: float = Field(gt=0, description="max |difference| allowed against onnxruntime")


class DataConfigSection(Section):
    path: str = Field(min_length=1)
    label_names: list[str] | None = None  # class names for sources that store class indices (e.g. an .npz)
    val_fraction: float = Field(ge=0, lt=1)
    test_fraction: float = Field(ge=0, lt=1)
    seed: int
    duplicates: Literal["drop_from_eval", "keep", "error"] = "drop_from_eval"  # val/test copies of train images
    min_per_class: int = Field(default=5, ge=1)  # warn when a class has fewer images in a split
    workers: int | None = Field(default=None, ge=0)  # decoding processes; None: one per core, 0: in-process


class ModelConfig(Section):
    source: str | list[str] = Field(min_length=1)  # several: the flow trains each under every strategy
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load pickled (.bin) weights, which can run code: only for files you trust

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)

    def each(self) -> list[ModelConfig]:
        """One config per source, with the same security settings."""
        return [self.model_copy(update={"source": source}) for source in self.sources]


def model_label(source: str) -> str:
    """A model's short name in run and task names: the last part of its directory, hub id or timm name
    (`timm:vit_small_patch16_224` -> `vit_small_patch16_224`, `hf:google/vit-base` -> `vit-base`)."""
    return source.rstrip("/").rsplit("/", 1)[-1].split(":", 1)[-1]


class PreprocessConfig(Section):
    image_size: int | None = Field(default=None, ge=8)


class TrainConfig(BaseModel):
    """Settings every strategy shares. Extra keys are the per-strategy sections, checked by `vitflow.training`."""

    model_config = ConfigDict(extra="allow", frozen=True)

    strategies: list[str] = Field(min_length=1)
    seed: int
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr_backbone: float = Field(gt=0)
    lr_head: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_ratio: float = Field(ge=0, lt=1)
    augment: bool = True
    crop_scale_min: float = Field(gt=0, le=1)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where the hardware runs it fast
    attention: Literal["auto", "sdpa", "eager"] = "auto"  # the attention kernel training uses; see vitflow.devices
    grad_accumulation: int = Field(default=1, ge=1)  # batches per optimizer step
    max_grad_norm: float | None = Field(default=1.0, gt=0)  # clip gradients to this norm; null: no clipping
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    patch_dropout: float = Field(default=0.0, ge=0, lt=1)  # fraction of patch tokens dropped per training image
    layer_decay: float = Field(default=1.0, gt=0, le=1)  # backbone lr x this per block below the top
    best_by: Literal["val_loss", "val_accuracy"] = "val_loss"  # what makes an epoch the best, to save and to wait for
    early_stopping_patience: int | None = Field(default=None, ge=1)  # epochs without a better one
    loader_workers: int | None = Field(default=None, ge=0)  # processes augmenting batches; None: see the engine

    def strategy_section(self, strategy: str) -> dict[str, Any]:
        """The `train.<strategy>` section as written (empty when absent)."""
        return dict((self.model_extra or {}).get(strategy) or {})

    def shared(self) -> dict[str, Any]:
        """The shared settings only, without the strategy list and the per-strategy sections."""
        return {name: getattr(self, name) for name in type(self).model_fields if name != "strategies"}


class EvaluateConfig(Section):
    batch_size: int = Field(ge=1)


class RegistryConfig(Section):
    model_name: str = Field(min_length=1)
    metric: Literal["accuracy", "macro_f1"]
    min_improvement: float = Field(ge=0)
    other_labels: Literal["new_model", "refuse"] = "new_model"  # data whose classes differ from the model's


class MlflowConfig(Section):
    experiment: str = Field(min_length=1)
    lock_wait_minutes: float = Field(default=60, ge=0, description="how long a run waits for an identical one")
    stale_run_hours: float = Field(default=12, gt=0, description="a RUNNING run older than this, with no live "
                                                                  "process behind it, is closed as KILLED")


class ExplainConfig(Section):
    images: int = Field(ge=1)
    method: Literal["gradient", "plain"] = "gradient"  # gradient: class-specific rollout for the predicted class
    head_fusion: Literal["mean", "max", "min"]
    discard_ratio: float = Field(ge=0, lt=1)

    @field_validator("head_fusion")
    @classmethod
    def _gradient_fuses_by_mean(cls, head_fusion: str, info: ValidationInfo) -> str:
        if info.data.get("method") == "gradient" and head_fusion != "mean":
            raise ValueError("gradient rollout averages the heads; use mean, or explain.method: plain")
        return head_fusion


class ExportConfig(Section):
    precisions: list[Literal["fp32", "fp16", "bf16", "int8"]]


class Config(Section):
    foundation: FoundationConfig
    data: DataConfigSection
    model: ModelConfig
    preprocess: PreprocessConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    registry: RegistryConfig
    mlflow: MlflowConfig
    explain: ExplainConfig
    export: ExportConfig

    def as_dict(self) -> dict[str, Any]:
        """Every setting as plain data (for MLflow params and fingerprints)."""
        return self.model_dump(mode="json")


def load_config(path: Path | str = PARAMS_FILE, overrides: list[str] | None = None) -> Config:
    """Read the YAML config at `path`, apply `overrides` ("section.key=value") and check every setting."""
    return parse_config(read_params(path, overrides), path)


def read_params(path: Path | str = PARAMS_FILE, overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML at `path` as a dict with `overrides` applied, not yet checked."""
    path = Path(path)
    if not path.is_file():
        raise VitflowError(f"{path}: config file not found; pass --params with the path to params.yaml")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise VitflowError(f"{path}: not valid YAML{where} ({error.problem or error.context}); fix the file") from None
    except yaml.YAMLError as error:
        raise VitflowError(f"{path}: not valid YAML ({error}); fix the file") from None
    if not isinstance(params, dict):
        raise VitflowError(f"{path}: expected sections of settings (a YAML mapping); fix the file")
    for override in overrides or []:
        params = apply_override(params, override)
    return params


def parse_config(params: dict[str, Any], source: Path | str = PARAMS_FILE) -> Config:
    """Check `params` against the typed sections; the first problem is one line naming the key."""
    try:
        return Config.model_validate(params)
    except ValidationError as error:
        raise VitflowError(describe_error(error, source)) from None


def describe_error(error: ValidationError, source: Path | str, prefix: str = "") -> str:
    """One line for the first problem pydantic found: file, dotted key, given value, what is allowed."""
    problem = error.errors()[0]
    key = prefix + ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "missing":
        return f"{source}: missing setting {key!r}; add it (see the project's params.yaml)"
    if problem["type"] == "extra_forbidden":
        return f"{source}: unknown setting {key!r}; remove it or check its spelling"
    message = problem["msg"].removeprefix("Value error, ")
    return f"{source}: {key}={problem['input']!r} is not allowed: {message}"


def apply_override(params: dict[str, Any], override: str) -> dict[str, Any]:
    """Return a copy of `params` with one "dotted.key=value" override applied; the value is parsed as YAML.

    The top-level section must exist; below it, missing keys are created (a per-strategy setting such as
    `train.full.lr_head` may be new) and checking them is left to `parse_config`.
    """
    key, sep, raw_value = override.partition("=")
    if not sep or not key:
        raise VitflowError(f"override {override!r}: expected KEY=VALUE, e.g. train.epochs=5")
    if "." not in key:
        raise VitflowError(f"override {override!r}: expected SECTION.KEY=VALUE, e.g. train.epochs=5")
    section, *parents, leaf = key.split(".")
    updated = copy.deepcopy(params)
    if not isinstance(updated.get(section), dict):
        raise VitflowError(f"override {override!r}: params.yaml has no section {section!r}")
    node = updated[section]
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise VitflowError(f"override {override!r}: {part!r} is a setting, not a section")
    node[leaf] = _parse_value(raw_value)
    return updated


def _parse_value(raw_value: str) -> Any:
    """YAML, except that "5e-4" is a number (PyYAML reads exponents without a dot as strings)."""
    value = yaml.safe_load(raw_value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value

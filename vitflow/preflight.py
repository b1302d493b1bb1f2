"""Check a run before any work starts: every setting, the strategies, the data path and the model source.

`plan_run` is what the CLI calls before starting Prefect, and what the flow calls first, so that bad input
fails in about the time it takes to import this module, in one line naming the file or setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitflow.config import Config, ModelConfig, load_config, model_label
from vitflow.data.sources import detect_source, versioned_path
from vitflow.errors import VitflowError
from vitflow.models import check_safetensors_only, resolve_backend
from vitflow.paths import PARAMS_FILE, project_path
from vitflow.training.strategies import ResolvedStrategy, check_train_config


@dataclass(frozen=True)
class RunPlan:
    config: Config
    strategies: list[ResolvedStrategy]
    data_path: Path
    models: list[ModelConfig]  # one per source: a project directory as an absolute path; ids and names as given
    builds_foundation: bool  # a model is the default backbone, rebuilt by DVC's `foundation` stage


def plan_run(params_file: Path | str = PARAMS_FILE, overrides: list[str] | None = None) -> RunPlan:
    """The checked config and what the run will use; a VitflowError for the first problem found."""
    config = load_config(params_file, overrides)
    strategies = check_train_config(config.train, str(params_file))
    data_path = project_path(config.data.path)
    if data_path.exists():
        detect_source(data_path)
    else:
        restorable = versioned_path(data_path)  # what DVC would restore: the data, or a table's folder
        if not restorable.with_name(f"{restorable.name}.dvc").is_file():
            raise VitflowError(f"{data_path}: data not found; set data.path or pass --data")
    foundation = project_path(config.foundation.output)
    if len(set(config.model.sources)) != len(config.model.sources):
        raise VitflowError(f"model.source={config.model.sources} names a model twice")
    labels = [model_label(source) for source in config.model.sources]
    if len(set(labels)) != len(labels):
        same = sorted({label for label in labels if labels.count(label) > 1})
        raise VitflowError(f"model.source={config.model.sources}: several models are named {same[0]!r} in run names; "
                           "rename a directory so that each ends in its own name")
    models = []
    for model in config.model.each():
        in_project = project_path(model.source)
        if in_project.exists() or in_project == foundation:
            model = model.model_copy(update={"source": str(in_project)})
        if in_project != foundation:
            resolve_backend(model.source)
            if not model.allow_pickle:
                check_safetensors_only(model.source)
        models.append(model)
    builds_foundation = any(Path(model.source) == foundation for model in models)
    return RunPlan(config, strategies, data_path, models, builds_foundation)

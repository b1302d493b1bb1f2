from pathlib import Path

import pandas as pd
from prefect import task

from vitflow.config import ModelConfig
from vitflow.data.cache import cache_key, preprocess_dataset
from vitflow.data.manifest import class_labels
from vitflow.models import DataConfig, load_pretrained
from vitflow.preflight import RunPlan, plan_run


@task(name="check-settings")
def plan_task(params_file: str, overrides: list[str] | None) -> RunPlan:
    """Every setting, the strategies, the data path and the model source, checked before any work."""
    return plan_run(params_file, overrides)


@task(name="inspect-model")
def inspect_model_task(model: ModelConfig, image_size: int | None) -> DataConfig:
    """Load the pretrained model once to read the preprocessing that travels with it."""
    return load_pretrained(model, image_size=image_size).data_config


@task(name="preprocess")
def preprocess_task(manifest: pd.DataFrame, data_path: str, data_version: str, data_config: DataConfig,
                    cache_root: str, workers: int | None) -> str:
    """Returns the cache directory, named by `cache_key`, so a re-run on the same data decodes nothing."""
    labels = class_labels(manifest)
    cache_dir = Path(cache_root) / cache_key(data_version, manifest, data_config, labels)
    return str(preprocess_dataset(manifest, data_path, data_config, labels, cache_dir, workers))

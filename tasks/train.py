from pathlib import Path

from prefect import task
from prefect.context import TaskRunContext

from vitflow.config import TrainConfig
from vitflow.data.cache import load_labels
from vitflow.identity import training_dir
from vitflow.paths import work_dir
from vitflow.training.loop import TrainResult, train_from_cache
from vitflow.training.strategies import resolve


def output_dir(parameters: dict) -> Path:
    """Where a training's outputs go, named by a fingerprint of data version, settings and code, never by run ids."""
    resolved = resolve(parameters["train"], parameters["strategy"])
    return training_dir(work_dir(), parameters["cache_file"], parameters["model_source"], parameters["image_size"],
                        resolved.as_dict())


def _training_cache_key(context: TaskRunContext, parameters: dict) -> str:
    """The same data, settings and code reuse the result (results and models both live in the work directory)."""
    out_dir = output_dir(parameters)
    return f"fine-tune-{out_dir.parent.name}-{out_dir.name}"


@task(name="fine-tune", cache_key_fn=_training_cache_key, persist_result=True)
def fine_tune_task(model_source: str, image_size: int | None, cache_file: str, strategy: str, train: TrainConfig,
                   trust_remote_code: bool = False) -> TrainResult:
    """A new head for the cache's labels, fine-tuned on its train and val splits."""
    parameters = {"model_source": model_source, "image_size": image_size, "cache_file": cache_file,
                  "strategy": strategy, "train": train}
    return train_from_cache(model_source, load_labels(cache_file), image_size, cache_file, resolve(train, strategy),
                            output_dir(parameters), trust_remote_code)

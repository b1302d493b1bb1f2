from prefect import task

from vitflow.config import ModelConfig, TrainConfig
from vitflow.data.cache import load_labels
from vitflow.identity import training_dir
from vitflow.paths import work_dir
from vitflow.training.loop import TrainResult, train_or_reuse
from vitflow.training.strategies import resolve


@task(name="fine-tune", task_run_name="fine-tune-{strategy}")
def fine_tune_task(model: ModelConfig, image_size: int | None, cache_dir: str, strategy: str,
                   train: TrainConfig) -> TrainResult:
    """A new head for the cache's labels, fine-tuned on its train and val splits. Its outputs are named by a
    fingerprint of data, settings and code, never by run ids, so a finished training is reused."""
    resolved = resolve(train, strategy)
    out_dir = training_dir(work_dir(), cache_dir, model.source, image_size, resolved.as_dict())
    return train_or_reuse(model, load_labels(cache_dir), image_size, cache_dir, resolved, out_dir)

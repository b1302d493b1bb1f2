from tasks.policy import tracking_task
from vitflow.config import ModelConfig, TrainConfig
from vitflow.data.cache import load_labels
from vitflow.identity import training_dir
from vitflow.paths import work_dir
from vitflow.tracking import configure_mlflow, live_training, tracking_server_errors
from vitflow.training.loop import TrainResult, train_or_reuse
from vitflow.training.strategies import resolve


@tracking_task(name="fine-tune")
def fine_tune_task(model: ModelConfig, image_size: int | None, cache_dir: str, strategy: str, train: TrainConfig,
                   run_id: str) -> TrainResult:
    """A new head for the cache's labels, fine-tuned on its train and val splits, logged live to MLflow run `run_id`.
    Its outputs are named by a fingerprint of data, settings and code, never by run ids, so a finished training is
    reused (and its stored history logged instead)."""
    resolved = resolve(train, strategy)
    out_dir = training_dir(work_dir(), cache_dir, model.source, image_size, resolved.as_dict())
    with live_training(configure_mlflow(), run_id) as observer:
        result = train_or_reuse(model, load_labels(cache_dir), image_size, cache_dir, resolved, out_dir,
                                observer=observer)
    with tracking_server_errors():
        observer.finish(result.history)
    return result

from pathlib import Path

from prefect import task

from vitflow.data.cache import load_split
from vitflow.devices import resolve_device
from vitflow.evaluation import EvalResult, evaluate_model
from vitflow.models import load_model


@task(name="evaluate")
def evaluate_task(model_dir: str, cache_dir: str, batch_size: int, device: str,
                  history: list[dict] | None = None) -> EvalResult:
    """Score the model, on `device` (`train.device`), on the test split; report files go beside the model,
    in `evaluation/`."""
    model = load_model(model_dir).to(resolve_device(device))
    return evaluate_model(model, load_split(cache_dir, "test"), Path(model_dir).parent / "evaluation", batch_size,
                          history)

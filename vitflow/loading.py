"""Which model to run: a checkpoint directory (no MLflow involved), or an MLflow model URI, or the champion.

MLflow is imported only on the URI path: `vitflow explain --model DIR` and `predict --model DIR` stay quick.
"""

from __future__ import annotations

from pathlib import Path

from vitflow.errors import VitflowError
from vitflow.models import load_model
from vitflow.precision import load_exported


def resolve_model(model: str | None, model_name: str):
    """A checkpoint directory, an MLflow model URI, or (None) the registered champion, as an `ImageClassifier`."""
    if model and Path(model).is_dir():
        return load_model(model).eval()

    def load(client, uri: str):
        from vitflow.serving import load_logged_model

        return load_logged_model(uri).eval()

    return _load_logged(model, model_name, load)


def resolve_runner(model: str | None, precision: str, model_name: str, device: str = "auto"):
    """Like `resolve_model`, but the model's export at `precision`, as a `vitflow.precision.ExportedModel`; a
    model directory runs on `device` (a `train.device` setting), a logged model where its loader puts it."""
    if model and Path(model).is_dir():
        runner = load_exported(model, device)
        if runner.precision != precision:
            raise VitflowError(f"{model}: holds a {runner.precision} model, not {precision}; pass --precision "
                               f"{runner.precision}, or a registered model URI to pick one of its exports")
        return runner

    def load(client, uri: str):
        from mlflow.models import get_model_info

        from vitflow.registry import exported_model_uri
        from vitflow.serving import load_logged_runner

        if precision != "fp32":
            uri = exported_model_uri(client, get_model_info(uri).run_id, precision)
        return load_logged_runner(uri)

    return _load_logged(model, model_name, load)


def _load_logged(model_uri: str | None, model_name: str, load):
    """`load(client, uri)` on an MLflow model URI, or (None) the registered champion; a failure becomes one line."""
    from vitflow.tracking import configure_mlflow

    client = configure_mlflow()
    uri = model_uri or f"models:/{model_name}@champion"
    try:
        return load(client, uri)
    except VitflowError:
        raise
    except Exception as error:  # MLflow raises several types for a missing model or alias
        raise VitflowError(f"model {uri}: cannot load it ({str(error).splitlines()[0]}); "
                           "run `vitflow run` first or pass --model") from None

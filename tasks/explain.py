import re
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from tasks.policy import tracking_task
from vitflow.config import ExplainConfig
from vitflow.data.cache import load_split
from vitflow.devices import resolve_device
from vitflow.explain.figures import rollout_markdown
from vitflow.explain.heatmaps import rollout_grid
from vitflow.models import load_model
from vitflow.tracking import configure_mlflow, log_run_artifact, log_values, tracking_server_errors


def artifact_key(run_name: str) -> str:
    """A Prefect artifact key for a run: 'rollout-' and the name in lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-")
    return f"rollout-{slug}" if slug else "rollout"


@tracking_task(name="attention-rollout")
def rollout_task(model_dir: str, cache_dir: str, run_id: str, explain: ExplainConfig, device: str = "auto") -> dict:
    """Draw the rollout grid for the test split on `device` (a `train.device` setting), log it to MLflow run
    `run_id` under rollout/ with its deletion scores as `explain_*` metrics, and report it as a Markdown
    artifact; returns the `rollout_grid` result plus "artifact_uri", where MLflow keeps the PNG."""
    result = rollout_grid(load_model(model_dir).to(resolve_device(device)), load_split(cache_dir, "test"),
                          Path(model_dir).parent / "rollout" / "attention_rollout.png", explain.images,
                          explain.method, explain.head_fusion, explain.discard_ratio)
    with tracking_server_errors():
        client = configure_mlflow()
        png_uri, name = log_run_artifact(client, run_id, result["path"], "rollout")
        log_values(client, run_id, metrics={f"explain_{key}": value for key, value in result["deletion"].items()})
    create_markdown_artifact(markdown=rollout_markdown(f"Attention rollout: {name}", result, png_uri),
                             key=artifact_key(name), description=f"attention rollout for MLflow run {run_id}")
    return {**result, "artifact_uri": png_uri}

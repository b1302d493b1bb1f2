import pandas as pd
from prefect.artifacts import create_table_artifact

from tasks.policy import tracking_task
from vitflow.config import RegistryConfig
from vitflow.data.manifest import class_labels
from vitflow.paths import work_dir
from vitflow.registry import PromotionDecision, champion_rescorer, model_name_for, promote, record_decision
from vitflow.reporting import artifact_rows, compare_runs
from vitflow.tracking import RegisteredVersion, configure_mlflow, tracking_server_errors


@tracking_task(name="choose-registered-model")
def model_name_task(registry: RegistryConfig, manifest: pd.DataFrame) -> str:
    """The registered model this data's label set goes to (checked before any training)."""
    with tracking_server_errors():
        return model_name_for(configure_mlflow(), registry, class_labels(manifest))


@tracking_task(name="promote")
def promote_task(parent_run_id: str, model_name: str, registry: RegistryConfig,
                 candidates: list[RegisteredVersion], data_version: str, cache_dir: str,
                 eval_batch_size: int) -> PromotionDecision:
    """Promote by the rule, re-scoring an older champion on this run's test split when needed."""
    rescore = champion_rescorer(model_name, registry.metric, cache_dir, eval_batch_size, work_dir() / "champion-eval")
    with tracking_server_errors():
        client = configure_mlflow()
        decision = promote(client, model_name, candidates, registry.metric, registry.min_improvement, data_version,
                           rescore)
        record_decision(client, parent_run_id, model_name, candidates, decision)
    return decision


@tracking_task(name="publish-comparison")
def publish_comparison_task(experiment_name: str, model_name: str, parent_run_id: str) -> None:
    """The flow run's strategy runs as the table artifact `strategy-comparison`, headline metrics first, with a link
    to each run in MLflow."""
    with tracking_server_errors():
        frame = compare_runs(configure_mlflow(), experiment_name, model_name, parent_run_id)
    create_table_artifact(table=artifact_rows(frame), key="strategy-comparison",
                          description="Strategies compared on the test split: headline metrics, then each run's "
                                      "MLflow page (or artifact folder) and settings")

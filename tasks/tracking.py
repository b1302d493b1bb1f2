from tasks.lifecycle import mark_crashed, owner
from tasks.policy import tracking_task
from vitflow.config import MlflowConfig
from vitflow.data.versioning import DataVersion
from vitflow.evaluation import EvalResult
from vitflow.tracking import (
    RegisteredVersion,
    TrackingStart,
    configure_mlflow,
    log_exports,
    log_strategy_run,
    start_tracking,
    tracking_server_errors,
)
from vitflow.training.loop import TrainResult


@tracking_task(name="start-tracking", log_prints=True)
def start_tracking_task(settings: MlflowConfig, params: dict, data_version: DataVersion, model_source: str,
                        force: bool) -> TrackingStart:
    """The parent run, once no identical run is running; closes runs a killed process left RUNNING."""
    tracking = start_tracking(settings, params, data_version, model_source, force, owner())
    for closed in tracking.closed:
        print(f"closed MLflow run {closed.run_id} as KILLED: {closed.reason}")
    mark_crashed(tracking.closed)
    return tracking


@tracking_task(name="log-and-register")
def log_strategy_task(tracking: TrackingStart, train: TrainResult, evaluation: EvalResult, params: dict,
                      manifest_csv: str, model_name: str) -> RegisteredVersion:
    with tracking_server_errors():
        return log_strategy_run(configure_mlflow(), tracking, train, evaluation, params, manifest_csv, model_name)


@tracking_task(name="log-exports")
def log_exports_task(run_id: str, records: list[dict]) -> None:
    with tracking_server_errors():
        log_exports(configure_mlflow(), run_id, records)

from tasks.lifecycle import mark_crashed, owner
from tasks.policy import tracking_task
from vitflow.config import MlflowConfig, TrainConfig
from vitflow.data.versioning import DataVersion
from vitflow.evaluation import EvalResult
from vitflow.tracking import (
    RegisteredVersion,
    TrackingStart,
    configure_mlflow,
    finish_strategy_run,
    log_dataset,
    log_exports,
    log_strategy_run,
    start_strategy_run,
    start_tracking,
    tracking_server_errors,
)
from vitflow.training.loop import TrainResult
from vitflow.training.strategies import resolve


@tracking_task(name="start-tracking", log_prints=True)
def start_tracking_task(settings: MlflowConfig, params: dict, data_version: DataVersion, model_sources: list[str],
                        force: bool) -> TrackingStart:
    """The parent run, once no identical run is running; closes runs a killed process left RUNNING."""
    tracking = start_tracking(settings, params, data_version, model_sources, force, owner())
    for closed in tracking.closed:
        print(f"closed MLflow run {closed.run_id} as KILLED: {closed.reason}")
    mark_crashed(tracking.closed)
    return tracking


@tracking_task(name="log-dataset")
def log_dataset_task(run_id: str, manifest_csv: str, data_version: DataVersion) -> None:
    with tracking_server_errors():
        log_dataset(configure_mlflow(), run_id, manifest_csv, data_version)


@tracking_task(name="start-run")
def start_strategy_task(tracking: TrackingStart, model_source: str, strategy: str, train: TrainConfig, params: dict,
                        manifest_csv: str, data_version: DataVersion) -> str:
    """The nested run of one model under one strategy, before it trains; returns its id."""
    with tracking_server_errors():
        return start_strategy_run(configure_mlflow(), tracking, model_source, strategy,
                                  resolve(train, strategy).as_dict(), params, manifest_csv, data_version)


@tracking_task(name="log-and-register")
def log_strategy_task(tracking: TrackingStart, run_id: str, model_source: str, train: TrainResult,
                      evaluation: EvalResult, manifest_csv: str, cache_dir: str, model_name: str) -> RegisteredVersion:
    with tracking_server_errors():
        return log_strategy_run(configure_mlflow(), tracking, run_id, model_source, train, evaluation, manifest_csv,
                                cache_dir, model_name)


@tracking_task(name="log-exports")
def log_exports_task(run_id: str, records: list[dict], cache_dir: str) -> None:
    with tracking_server_errors():
        log_exports(configure_mlflow(), run_id, records, cache_dir)


@tracking_task(name="finish-run")
def finish_strategy_task(version: RegisteredVersion, model_name: str) -> None:
    with tracking_server_errors():
        finish_strategy_run(configure_mlflow(), version.run_id, model_name, version.version)

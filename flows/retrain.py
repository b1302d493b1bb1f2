"""The `retrain` flow: version the data, preprocess, fine-tune every strategy, evaluate, register, promote.

    from flows.retrain import retrain
    summary = retrain(overrides=["train.epochs=1"])

Every step is a task in `tasks/`; this module only chains them.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.data import build_manifest_task, version_data_task
from tasks.evaluate import evaluate_task
from tasks.explain import rollout_task
from tasks.export import export_task
from tasks.foundation import foundation_task
from tasks.lifecycle import end_run_records, release_run_lock
from tasks.preprocess import inspect_model_task, plan_task, preprocess_task
from tasks.registry import model_name_task, promote_task, publish_comparison_task
from tasks.tracking import (
    finish_strategy_task,
    log_dataset_task,
    log_exports_task,
    log_strategy_task,
    start_strategy_task,
    start_tracking_task,
)
from tasks.train import fine_tune_task
from vitflow.config import Config, ModelConfig
from vitflow.data.versioning import DataVersion
from vitflow.errors import VitflowError
from vitflow.paths import PARAMS_FILE, work_dir
from vitflow.tracking import RegisteredVersion, TrackingStart, system_metrics


@dataclass(frozen=True)
class StrategyBranch:
    """What every strategy's branch of the flow shares."""

    config: Config
    tracking: TrackingStart
    model: ModelConfig  # with the source resolved
    cache_dir: str
    manifest_csv: str
    model_name: str  # the registered model this data's label set goes to
    data_version: DataVersion


@task(name="strategy", task_run_name="strategy-{strategy}")
def strategy_task(strategy: str, branch: StrategyBranch) -> RegisteredVersion:
    """One strategy's branch: its MLflow run, then fine-tune (logged live), evaluate, log and register, explain,
    export, and the run ends; the machine's load is logged to the run meanwhile.

    Strategies are independent, so the flow's task runner may run these branches concurrently
    (threads by default, or Dask workers on other machines).
    """
    config = branch.config
    run_id = start_strategy_task(branch.tracking, strategy, config.train, config.as_dict(), branch.manifest_csv,
                                 branch.data_version)
    with system_metrics(run_id):
        trained = fine_tune_task(branch.model, config.preprocess.image_size, branch.cache_dir, strategy, config.train,
                                 run_id)
        evaluation = evaluate_task.with_options(task_run_name=f"evaluate-{strategy}")(
            trained.model_dir, branch.cache_dir, config.evaluate.batch_size, config.train.device, trained.history)
        version = log_strategy_task(branch.tracking, run_id, trained, evaluation, branch.manifest_csv,
                                    branch.cache_dir, branch.model_name)
        rollout_task(trained.model_dir, branch.cache_dir, version.run_id, config.explain, config.train.device)
        exports = export_task.with_options(task_run_name=f"export-{strategy}")(
            trained.model_dir, branch.cache_dir, config.export, config.evaluate.batch_size, config.train.device)
        log_exports_task.with_options(task_run_name=f"log-exports-{strategy}")(run_id, exports, branch.cache_dir)
    finish_strategy_task(version, branch.model_name)
    return version


def task_runner(kind: str = "threads", workers: int = 1, dask_address: str | None = None):
    """The task runner for the strategy branches: `threads` (in this process) or `dask`
    (a local cluster of `workers` processes, or the scheduler at `dask_address`)."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    raise VitflowError(f"task runner {kind!r}: use threads or dask")


@flow(name="retrain", task_runner=task_runner(), on_completion=[release_run_lock],
      on_failure=[end_run_records], on_crashed=[end_run_records], on_cancellation=[end_run_records])
def retrain(overrides: list[str] | None = None, params_file: str = str(PARAMS_FILE), force: bool = False) -> dict:
    """Run the whole pipeline with params.yaml plus `overrides`; returns a summary for the CLI.

    When the data version, params and code match the last finished run, it records that there
    was nothing to do and trains nothing, unless `force`.
    """
    plan = plan_task(params_file, overrides)
    config = plan.config
    if plan.builds_foundation:
        foundation_task()
    data_version = version_data_task(str(plan.data_path))
    tracking = start_tracking_task(config.mlflow, config.as_dict(), data_version, config.model.source, force)
    summary = {"parent_run_id": tracking.parent_run_id, "experiment_id": tracking.experiment_id,
               "data_version": data_version.hash}
    if tracking.same_as_run:
        return {**summary, "nothing_to_do": True, "same_as_run": tracking.same_as_run}

    manifest_csv = str(work_dir() / "manifests" / f"{data_version.short}.csv")
    manifest = build_manifest_task(str(plan.data_path), config.data, manifest_csv)
    log_dataset_task(tracking.parent_run_id, manifest_csv, data_version)
    model_name = model_name_task(config.registry, manifest)
    data_config = inspect_model_task(plan.model, config.preprocess.image_size)
    cache_dir = preprocess_task(manifest, str(plan.data_path), data_version.hash, data_config,
                                str(work_dir() / "cache"), config.data.workers)

    branch = StrategyBranch(config, tracking, plan.model, cache_dir, manifest_csv, model_name, data_version)
    futures = [strategy_task.submit(strategy.name, branch) for strategy in plan.strategies]
    registered = [future.result() for future in futures]

    decision = promote_task(tracking.parent_run_id, model_name, config.registry, registered, data_version.hash,
                            cache_dir, config.evaluate.batch_size)
    publish_comparison_task(config.mlflow.experiment, model_name, tracking.parent_run_id)
    return {**summary, "nothing_to_do": False, "registered": registered, "decision": decision,
            "model_name": model_name, "skipped_images": int((manifest["status"] != "ok").sum())}

"""The `retrain` flow: version the data, preprocess, fine-tune every model under every strategy, evaluate, register,
promote.

    from flows.retrain import retrain
    summary = retrain(overrides=["train.epochs=1"])

Every step is a task in `tasks/`; this module only chains them.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import Task, flow, task
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
from vitflow.config import Config, ModelConfig, model_label
from vitflow.data.versioning import DataVersion
from vitflow.errors import VitflowError
from vitflow.paths import PARAMS_FILE, work_dir
from vitflow.tracking import RegisteredVersion, TrackingStart, system_metrics


@dataclass(frozen=True)
class ModelBranch:
    """What the branches of one pretrained model share: every strategy fine-tunes it from the same cache."""

    config: Config
    tracking: TrackingStart
    model: ModelConfig  # with the source resolved
    cache_dir: str  # the data preprocessed for this model
    manifest_csv: str
    model_name: str  # the registered model this data's label set goes to
    data_version: DataVersion

    @property
    def label(self) -> str:
        return model_label(self.model.source)


def named(step: Task, branch: str) -> Task:
    """`step` with its task runs named after the branch, e.g. `fine-tune-foundation-full`."""
    return step.with_options(task_run_name=f"{step.name}-{branch}")


@task(name="branch", task_run_name="{branch.label}-{strategy}")
def branch_task(branch: ModelBranch, strategy: str) -> RegisteredVersion:
    """One model under one strategy: its MLflow run, then fine-tune (logged live), evaluate, log and register,
    explain, export, and the run ends; the machine's load is logged to the run meanwhile.

    Branches are independent, so the flow's task runner may run them concurrently
    (threads by default, or Dask workers on other machines).
    """
    config, name = branch.config, f"{branch.label}-{strategy}"
    run_id = named(start_strategy_task, name)(branch.tracking, branch.model.source, strategy, config.train,
                                              config.as_dict(), branch.manifest_csv, branch.data_version)
    with system_metrics(run_id):
        trained = named(fine_tune_task, name)(branch.model, config.preprocess.image_size, branch.cache_dir, strategy,
                                              config.train, run_id)
        evaluation = named(evaluate_task, name)(trained.model_dir, branch.cache_dir, config.evaluate.batch_size,
                                                config.train.device, trained.history)
        version = named(log_strategy_task, name)(branch.tracking, run_id, branch.model.source, trained, evaluation,
                                                 branch.manifest_csv, branch.cache_dir, branch.model_name)
        named(rollout_task, name)(trained.model_dir, branch.cache_dir, version.run_id, config.explain,
                                  config.train.device)
        exports = named(export_task, name)(trained.model_dir, branch.cache_dir, config.export,
                                           config.evaluate.batch_size, config.train.device)
        named(log_exports_task, name)(run_id, exports, branch.cache_dir)
    named(finish_strategy_task, name)(version, branch.model_name)
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
    tracking = start_tracking_task(config.mlflow, config.as_dict(), data_version,
                                   [model.source for model in plan.models], force)
    summary = {"parent_run_id": tracking.parent_run_id, "experiment_id": tracking.experiment_id,
               "data_version": data_version.hash}
    if tracking.same_as_run:
        return {**summary, "nothing_to_do": True, "same_as_run": tracking.same_as_run}

    manifest_csv = str(work_dir() / "manifests" / f"{data_version.short}.csv")
    manifest = build_manifest_task(str(plan.data_path), config.data, manifest_csv)
    log_dataset_task(tracking.parent_run_id, manifest_csv, data_version)
    model_name = model_name_task(config.registry, manifest)
    branches = []
    for model in plan.models:  # models with the same preprocessing share one cache (`cache_key`)
        label = model_label(model.source)
        data_config = named(inspect_model_task, label)(model, config.preprocess.image_size)
        cache_dir = named(preprocess_task, label)(manifest, str(plan.data_path), data_version.hash, data_config,
                                                  str(work_dir() / "cache"), config.data.workers)
        branches.append(ModelBranch(config, tracking, model, cache_dir, manifest_csv, model_name, data_version))

    futures = [branch_task.submit(branch, strategy.name) for branch in branches for strategy in plan.strategies]
    registered = [future.result() for future in futures]

    decision = promote_task(tracking.parent_run_id, model_name, config.registry, registered, data_version.hash,
                            cache_dir, config.evaluate.batch_size)
    publish_comparison_task(config.mlflow.experiment, model_name, tracking.parent_run_id)
    return {**summary, "nothing_to_do": False, "registered": registered, "decision": decision,
            "model_name": model_name, "skipped_images": int((manifest["status"] != "ok").sum())}

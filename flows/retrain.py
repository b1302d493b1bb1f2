"""The `retrain` flow: version the data, preprocess, fine-tune every strategy, evaluate, register, promote.

    from flows.retrain import retrain
    summary = retrain(overrides=["train.epochs=1"])

Every step is a task in `tasks/`; this module only chains them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.data import build_manifest_task, class_labels, version_data_task
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.foundation import foundation_task
from tasks.preprocess import preprocess_task
from tasks.register import RegisteredVersion, log_exports_task, log_strategy_task, promote_task, start_tracking_task
from tasks.registry_ops import publish_comparison_task
from tasks.rollout import rollout_task
from tasks.train import TrainSettings, fine_tune_task, output_dir
from vitflow import PROJECT_ROOT, WORK_DIR
from vitflow.config import PARAMS_FILE, load_params
from vitflow.errors import VitflowError
from vitflow.models import DataConfig, load_model
from vitflow.tracking import git_state, run_fingerprint


def resolve_path(path: str) -> Path:
    """Paths in params.yaml are relative to the project; absolute ones stay as they are."""
    return Path(path) if Path(path).is_absolute() else PROJECT_ROOT / path


def resolve_model_source(params: dict) -> str:
    """A model source that names a project directory becomes its absolute path; ids and names stay."""
    source = params["model"]["source"]
    in_project = resolve_path(source)
    return str(in_project) if in_project.exists() or source == params["foundation"]["output"] else source


@task(name="inspect-model")
def inspect_model_task(model_source: str, labels: list[str], image_size: int | None,
                       trust_remote_code: bool) -> DataConfig:
    """Load the pretrained model once to read the preprocessing that travels with it."""
    return load_model(model_source, labels, image_size, trust_remote_code).data_config


@dataclass(frozen=True)
class StrategyBranch:
    """What every strategy's branch of the flow shares."""

    experiment_id: str
    parent_run_id: str
    run_name: str  # with a {strategy} placeholder
    model_source: str
    labels: list[str]
    cache_file: str
    params: dict
    tags: dict[str, str]
    manifest_csv: str


@task(name="strategy")
def strategy_task(strategy: str, branch: StrategyBranch) -> RegisteredVersion:
    """One strategy's branch: fine-tune, evaluate, log and register, explain, export.

    Strategies are independent, so the flow's task runner may run these branches concurrently
    (threads by default, or Dask workers on other machines).
    """
    params = branch.params
    image_size, settings = params["preprocess"]["image_size"], TrainSettings.from_params(params)
    out_dir = output_dir(WORK_DIR, branch.cache_file, branch.model_source, image_size, settings, strategy)
    trained = fine_tune_task(branch.model_source, branch.labels, image_size, branch.cache_file, strategy,
                             settings, str(out_dir), params["model"]["trust_remote_code"])
    evaluation = evaluate_task(trained.model_dir, branch.cache_file, str(out_dir / "evaluation"),
                               params["evaluate"]["batch_size"], trained.history)
    version = log_strategy_task(branch.experiment_id, branch.parent_run_id, branch.run_name.format(strategy=strategy),
                                trained, evaluation, params, branch.tags, branch.manifest_csv,
                                params["registry"]["model_name"])
    rollout_task(trained.model_dir, branch.cache_file, str(out_dir / "rollout"), version.run_id,
                 params["explain"]["images"], params["explain"]["head_fusion"], params["explain"]["discard_ratio"])
    exports = export_task(trained.model_dir, branch.cache_file, str(out_dir / "exports"),
                          params["export"]["precisions"], params["evaluate"]["batch_size"])
    log_exports_task(version.run_id, exports)
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


@flow(name="retrain", task_runner=task_runner())
def retrain(overrides: list[str] | None = None, params_file: str = str(PARAMS_FILE), force: bool = False) -> dict:
    """Run the whole pipeline with params.yaml plus `overrides`; returns a summary for the CLI.

    When the data version, params and code match the last finished run, it records that there
    was nothing to do and trains nothing, unless `force`.
    """
    params = load_params(params_file, overrides)
    data_params, train_params = params["data"], params["train"]
    model_source = resolve_model_source(params)
    if model_source == str(resolve_path(params["foundation"]["output"])):
        foundation_task()
    data_dir = str(resolve_path(data_params["path"]))

    data_version = version_data_task(data_dir)
    tags = {"data_version": data_version.hash, "data_dirty": str(data_version.dirty).lower(),
            "data_tracked": str(data_version.tracked).lower(), "model_source": params["model"]["source"],
            **git_state()}
    tags["mlflow.source.git.commit"] = tags["git_commit"]
    model_short = Path(params["model"]["source"].rstrip("/")).name
    tracking = start_tracking_task(params["mlflow"]["experiment"], f"retrain-{model_short}-{data_version.short}",
                                   params, tags, run_fingerprint(data_version.hash, params), force)
    experiment_id, parent_run_id = tracking.experiment_id, tracking.parent_run_id
    if tracking.same_as_run:
        return {"nothing_to_do": True, "same_as_run": tracking.same_as_run, "parent_run_id": parent_run_id,
                "experiment_id": experiment_id, "data_version": data_version.hash}

    manifest_csv = str(WORK_DIR / "manifests" / f"{data_version.short}.csv")
    manifest = build_manifest_task(data_dir, data_params["val_fraction"], data_params["test_fraction"],
                                   data_params["seed"], manifest_csv)
    labels = class_labels(manifest)
    image_size = params["preprocess"]["image_size"]
    trust_remote_code = params["model"]["trust_remote_code"]
    data_config = inspect_model_task(model_source, labels, image_size, trust_remote_code)
    cache_file = preprocess_task(manifest, data_dir, data_version.hash, data_config, labels,
                                 str(WORK_DIR / "cache"))

    branch = StrategyBranch(experiment_id, parent_run_id, f"{model_short}-{{strategy}}-{data_version.short}",
                            model_source, labels, cache_file, params, tags, manifest_csv)
    futures = [strategy_task.submit(strategy, branch) for strategy in train_params["strategies"]]
    registered = [future.result() for future in futures]

    decision = promote_task(parent_run_id, params["registry"]["model_name"], registered,
                            params["registry"]["metric"], params["registry"]["min_improvement"], data_version.hash,
                            cache_file, params["evaluate"]["batch_size"], str(WORK_DIR))
    publish_comparison_task(params["mlflow"]["experiment"], params["registry"]["model_name"], parent_run_id)
    skipped = int((manifest["status"] != "ok").sum())
    return {"nothing_to_do": False, "parent_run_id": parent_run_id, "experiment_id": experiment_id,
            "data_version": data_version.hash, "registered": registered, "decision": decision,
            "skipped_images": skipped, "model_name": params["registry"]["model_name"]}

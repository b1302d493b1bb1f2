"""MLflow: where runs are recorded, and what each flow run logs there.

By default MLflow writes to a SQLite store under `mlruns/` (artifacts beside it), so no server is
needed; set `MLFLOW_TRACKING_URI` to use a tracking server instead. One parent run per flow run, one
nested run per strategy; each strategy's model is logged as a pyfunc model and registered as a version.
A connection failure to the tracking server becomes `TrackingServerUnreachable`, one line long.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import requests
from mlflow.tracking import MlflowClient

from vitflow import locks
from vitflow.config import MlflowConfig
from vitflow.data.versioning import DataVersion, git_state
from vitflow.errors import ServiceUnreachable
from vitflow.evaluation import EvalResult
from vitflow.identity import run_fingerprint
from vitflow.models.base import read_sidecar
from vitflow.paths import MLRUNS_DIR, PROJECT_ROOT, work_dir
from vitflow.serving import SIGNATURE
from vitflow.training.loop import TrainResult

SERVING_PACKAGES = ("torch", "torchvision", "timm", "transformers", "safetensors", "pillow", "numpy", "pandas",
                    "onnxruntime")


class TrackingServerUnreachable(ServiceUnreachable):
    """The MLflow tracking server did not answer, even after retries."""


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else the project's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{MLRUNS_DIR / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` tracking URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def configure_mlflow() -> MlflowClient:
    """Point MLflow's tracking and registry at `tracking_uri()` and return a client for it."""
    uri = tracking_uri()
    if database := sqlite_file(uri):
        database.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created on first use (with a SQLite store, artifacts go beside the database)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    database = sqlite_file(tracking_uri())
    location = (database.resolve().parent / "artifacts").as_uri() if database else None
    return client.create_experiment(name, artifact_location=location)


def _is_connection_failure(error: BaseException | None) -> bool:
    """Whether `error` or an exception it wraps is a refused, reset or timed-out connection."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def tracking_server_errors() -> Iterator[None]:
    """Turn a failure to reach the tracking server into one line: what failed, where the models are, what to do."""
    try:
        yield
    except Exception as error:
        if not _is_connection_failure(error):
            raise
        raise TrackingServerUnreachable(
            f"MLflow tracking server at {tracking_uri()} is unreachable (connection failed after retries); "
            f"trained models are kept in {work_dir()}; run `vitflow run` again when it is back") from None


@dataclass
class RegisteredVersion:
    strategy: str
    run_id: str
    version: int | str  # as the MLflow store returns it (an int from SQL stores)
    metrics: dict[str, float]


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"epochs": 3}} -> {"train.epochs": "3"}, for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def log_values(client: MlflowClient, run_id: str, params: dict[str, str] | None = None,
               metrics: dict[str, float] | None = None, history: list[dict] | None = None) -> None:
    """Log params, metrics and per-epoch `history` rows ({"epoch", name: value, ...}) in as few calls as
    MLflow's batch limits allow."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    entries = [Metric(key, float(value), now, 0) for key, value in (metrics or {}).items()]
    entries += [Metric(key, float(value), now, row["epoch"]) for row in history or []
                for key, value in row.items() if key != "epoch"]
    params_list = [Param(key, value) for key, value in (params or {}).items()]
    for start in range(0, max(len(entries), len(params_list)), 100):
        client.log_batch(run_id, metrics=entries[start:start + 100], params=params_list[start:start + 100])


def start_parent_run(client: MlflowClient, experiment_id: str, run_name: str, params: dict,
                     tags: dict[str, str]) -> str:
    """Create the flow run's parent run with all params and the data/code version tags; return its id."""
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    log_values(client, run.info.run_id, params=flatten(params))
    return run.info.run_id


def log_strategy_run(client: MlflowClient, tracking: TrackingStart, train: TrainResult, evaluation: EvalResult,
                     params: dict, manifest_csv: str, model_name: str) -> RegisteredVersion:
    """One nested run: the params that apply to its strategy, per-epoch history, test metrics, artifacts,
    the model and its registry version.

    A training already registered (the same `training_key`: data, settings and code) is not registered
    again: the run notes the version it reuses (`model_version`).
    """
    tags = tracking.tags
    run = client.create_run(tracking.experiment_id, run_name=tracking.strategy_run_name(train.strategy),
                            tags={**tags, "mlflow.parentRunId": tracking.parent_run_id, "strategy": train.strategy})
    run_id = run.info.run_id
    metrics = {**evaluation.metrics, "trainable_params": train.trainable_params, "total_params": train.total_params,
               "train_seconds": train.train_seconds, "train_images_per_second": train.images_per_second,
               "peak_rss_mb": train.peak_rss_mb}
    shared = {section: values for section, values in params.items() if section != "train"}
    log_values(client, run_id, params={**flatten({**shared, "train": train.settings}), "strategy": train.strategy},
               metrics=metrics, history=train.history)
    for path in [*evaluation.artifacts, manifest_csv]:
        client.log_artifact(run_id, path)
    key = training_key(train.model_dir)
    registered = client.search_model_versions(f"name = '{model_name}' and tags.training_key = '{key}'")
    if registered:
        version = min(registered, key=lambda found: int(found.version))
    else:
        model_info = log_pyfunc_model(run_id, "model", train.model_dir, {"precision": "fp32"})
        sidecar = read_sidecar(train.model_dir)
        version_tags = {**tags, "strategy": train.strategy, "run_id": run_id, "training_key": key,
                        "labels": json.dumps(sidecar["labels"]),
                        "image_size": str(sidecar["data_config"]["image_size"]),
                        **{name: f"{metrics[name]:.6g}" for name in ("test_accuracy", "test_macro_f1")}}
        version = mlflow.register_model(model_info.model_uri, model_name, tags=version_tags)
    client.set_tag(run_id, "model_version", str(version.version))
    client.set_terminated(run_id)
    return RegisteredVersion(train.strategy, run_id, version.version, metrics)


def training_key(model_dir: str) -> str:
    """"<fingerprint>/<strategy>" of a training's output folder (see `vitflow.identity.training_dir`)."""
    return "/".join(Path(model_dir).parts[-3:-1])


def log_pyfunc_model(run_id: str, name: str, model_dir: str, tags: dict[str, str]):
    """Log the checkpoint or export in `model_dir` as an MLflow pyfunc model (from code) in run `run_id`."""
    with mlflow.start_run(run_id=run_id):  # log_model needs an active run in this thread
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(PROJECT_ROOT / "vitflow" / "mlflow_model.py"),
            artifacts={"model_dir": model_dir}, code_paths=[str(PROJECT_ROOT / "vitflow")],
            signature=SIGNATURE, pip_requirements=serving_requirements(), tags=tags)


def log_exports(client: MlflowClient, run_id: str, records: list[dict]) -> None:
    """Each reduced-precision export becomes its own model `model-<precision>` in the strategy's run,
    tagged with its precision; its agreement with FP32 is logged as metrics."""
    for record in records:
        precision = record["precision"]
        log_values(client, run_id, metrics={f"{precision}_{key}": record[key] for key in
                                            ("top1_agreement", "max_abs_logit_diff", "accuracy", "size_ratio_vs_fp32")})
        client.set_tag(run_id, f"{precision}_compute", record["compute"])
        log_pyfunc_model(run_id, f"model-{precision}", record["path"],
                         {"precision": precision, "compute": record["compute"],
                          "top1_agreement": f"{record['top1_agreement']:.6g}"})


def serving_requirements() -> list[str]:
    """Pinned versions of what loading the model needs, taken from this environment."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in SERVING_PACKAGES]


def find_finished_run(client: MlflowClient, experiment_id: str, fingerprint: str) -> str | None:
    """The flow run that trained with this fingerprint (same data, params and code) and finished, or None.

    A nothing-to-do run points at the run it matched, so a chain of them still names the one that trained.
    """
    runs = client.search_runs([experiment_id], f"tags.run_fingerprint = '{fingerprint}' and "
                              "attributes.status = 'FINISHED'", max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].data.tags.get("same_as_run", runs[0].info.run_id) if runs else None


@dataclass
class ClosedRun:
    run_id: str
    flow_run_id: str | None  # the Prefect flow run that created it
    reason: str


@dataclass
class TrackingStart:
    """The flow run's parent run, and what its strategy runs share."""

    experiment_id: str
    parent_run_id: str
    same_as_run: str | None  # set when an earlier finished run had the same data, params and code
    tags: dict[str, str]  # data and code version, model source, who runs it
    name: str  # "<model>-{strategy}-<data version>"
    closed: list[ClosedRun]  # abandoned runs this start closed

    def strategy_run_name(self, strategy: str) -> str:
        return self.name.format(strategy=strategy)


def run_tags(data_version: DataVersion, model_source: str, owner: str) -> dict[str, str]:
    """Which data, model and code a run used, and which process runs it, as MLflow tags."""
    tags = {"data_version": data_version.hash, "data_dirty": str(data_version.dirty).lower(),
            "data_tracked": str(data_version.tracked).lower(), "model_source": model_source, **git_state(),
            "prefect.flow_run_id": owner, "vitflow.pid": str(os.getpid()), "vitflow.host": socket.gethostname()}
    tags["mlflow.source.git.commit"] = tags["git_commit"]
    return tags


def start_tracking(settings: MlflowConfig, params: dict, data_version: DataVersion, model_source: str, force: bool,
                   owner: str) -> TrackingStart:
    """Create the parent run, or, when data, params and code match a finished run and not `force`,
    a finished run that records there was nothing to do. Only parent runs carry `run_fingerprint`.

    Two runs with the same fingerprint do not run at once: the second waits for the first (a lock named by
    the fingerprint, held by `owner` until `locks.release_all(owner)` or its process ends), then finds it
    finished. Runs left RUNNING by a process that is gone are closed as KILLED first.
    """
    fingerprint = run_fingerprint(data_version.hash, params)
    locks.acquire(work_dir() / "locks" / f"{fingerprint}.lock", owner, settings.lock_wait_minutes * 60,
                  "a run with the same data, params and code")
    model_short = Path(model_source.rstrip("/")).name
    run_name = f"retrain-{model_short}-{data_version.short}"
    tags = run_tags(data_version, model_source, owner)
    parent_tags = {**tags, "run_fingerprint": fingerprint}
    with tracking_server_errors():
        client = configure_mlflow()
        experiment_id = ensure_experiment(client, settings.experiment)
        closed = close_abandoned_runs(client, experiment_id, settings.stale_run_hours)
        previous = None if force else find_finished_run(client, experiment_id, fingerprint)
        if previous is None:
            run_id = start_parent_run(client, experiment_id, run_name, params, parent_tags)
        else:
            run = client.create_run(experiment_id, run_name=f"{run_name}-nothing-to-do",
                                    tags={**parent_tags, "nothing_to_do": "true", "same_as_run": previous})
            client.set_terminated(run.info.run_id)
            run_id = run.info.run_id
    return TrackingStart(experiment_id, run_id, previous, tags, f"{model_short}-{{strategy}}-{data_version.short}",
                         closed)


def close_abandoned_runs(client: MlflowClient, experiment_id: str, stale_hours: float) -> list[ClosedRun]:
    """End as KILLED the runs still RUNNING whose process is gone (same host), or, when that cannot be told,
    that started more than `stale_hours` ago; the versions they registered without a decision say so."""
    closed = []
    now_ms = time.time() * 1000
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        pid, host = tags.get("vitflow.pid"), tags.get("vitflow.host")
        alive = locks.process_alive(int(pid), host) if pid and host else None
        hours = (now_ms - run.info.start_time) / 3.6e6
        if alive is False:
            reason = f"abandoned: its process {pid} on {host} is gone"
        elif alive is None and hours > stale_hours:
            reason = f"abandoned: still RUNNING {hours:.1f} h after it started (mlflow.stale_run_hours={stale_hours})"
        else:
            continue
        end_run(client, run.info.run_id, "KILLED", reason)
        closed.append(ClosedRun(run.info.run_id, tags.get("prefect.flow_run_id"), reason))
    return closed


def end_runs_of(flow_run_id: str, status: str, reason: str) -> list[str]:
    """End the runs the Prefect flow run `flow_run_id` left RUNNING with `status` (FAILED, KILLED); their ids."""
    client = configure_mlflow()
    experiment_ids = [experiment.experiment_id for experiment in client.search_experiments()]
    if not experiment_ids:
        return []
    runs = client.search_runs(experiment_ids, f"tags.`prefect.flow_run_id` = '{flow_run_id}' and "
                              "attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        end_run(client, run.info.run_id, status, reason)
    return [run.info.run_id for run in runs]


def end_run(client: MlflowClient, run_id: str, status: str, reason: str) -> None:
    """End run `run_id` with `status` and the reason as its `end_reason` tag; a model version it registered
    that has no decision yet gets one saying the run ended before deciding."""
    client.set_tag(run_id, "end_reason", reason[:5000])
    client.set_terminated(run_id, status)
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        if "decision" not in version.tags:
            client.set_model_version_tag(version.name, version.version, "decision", "undecided")
            why = f"the run that registered it ended ({status}) before deciding: {reason}"
            client.set_model_version_tag(version.name, version.version, "decision_reason", why[:5000])


def log_run_artifact(client: MlflowClient, run_id: str, path: str, folder: str) -> tuple[str, str]:
    """Log the file at `path` under `folder` in run `run_id`; returns (its artifact URI, the run's strategy or name)."""
    client.log_artifact(run_id, path, folder)
    run = client.get_run(run_id)
    name = run.data.tags.get("strategy") or run.info.run_name or run_id
    return f"{run.info.artifact_uri}/{folder}/{Path(path).name}", name

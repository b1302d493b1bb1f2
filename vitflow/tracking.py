"""MLflow: where runs are recorded, and what each flow run logs there.

By default MLflow writes to a SQLite store under `mlruns/` (artifacts beside it), so no server is
needed; set `MLFLOW_TRACKING_URI` to use a tracking server instead. One parent run per flow run, one
nested run per strategy, created before its training: its loss, learning rates and validation scores
(`LiveMetrics`) and the machine's load (`system_metrics`) show while it trains. Each strategy's model is
logged as a pyfunc model and registered as a version whose description is a model card.

Metric names: a strategy run's headline metrics (`HEADLINE_METRICS`) have no prefix and sort first, as
MLflow's compare view sorts names by character code; every other name has a prefix that sorts after them:
`model/`, `precision/` (the exports against FP32), `step/` (per optimizer update), `system/`, `test/`,
and `train/`, `val/` (per epoch).
A connection failure to the tracking server becomes `TrackingServerUnreachable`, one line long.
"""

from __future__ import annotations

import getpass
import importlib.metadata
import io
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NOTE,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

from vitflow import locks
from vitflow.cards import HEADLINE_METRICS, model_card, strategy_run_note
from vitflow.config import MlflowConfig, model_label
from vitflow.data.cache import load_split
from vitflow.data.versioning import DataVersion, git_state
from vitflow.errors import ServiceUnreachable
from vitflow.evaluation import EvalResult
from vitflow.identity import run_fingerprint
from vitflow.models.base import read_sidecar
from vitflow.paths import MLRUNS_DIR, PROJECT_ROOT, work_dir
from vitflow.serving import SIGNATURE
from vitflow.training.engine import TrainingObserver
from vitflow.training.loop import TrainResult

SERVING_PACKAGES = ("torch", "torchvision", "timm", "transformers", "safetensors", "pillow", "numpy", "pandas",
                    "onnxruntime")
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # a classic ML experiment, not GenAI
RUNS_VIEW = "vitflow"  # the name of the runs list's shared view in the MLflow UI (`share_runs_view`)
log = logging.getLogger(__name__)


class TrackingServerUnreachable(ServiceUnreachable):
    """The MLflow tracking server did not answer, even after retries."""


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else the project's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{MLRUNS_DIR / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` tracking URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def server_url() -> str | None:
    """The tracking server's address when runs go to one (http or https), else None."""
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def experiment_page(ui_url: str, experiment_id: str) -> str:
    """The experiment's runs in the MLflow UI at `ui_url` as `share_runs_view` saved them, in the UI's model-training
    view (it opens on GenAI)."""
    return (f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW}"
            "&workflowType=machine_learning")


def branch_label(model: str, strategy: str, models: list[str]) -> str:
    """What names one (model, strategy) branch of a flow run that trains `models` in its summary metrics: the
    strategy alone, or `<model>-<strategy>` when there are several models."""
    return strategy if len(set(models)) == 1 else f"{model}-{strategy}"


def share_runs_view(client: MlflowClient, experiment_id: str, branches: list[str]) -> None:
    """Save how `experiment_page` shows the runs (by default the UI shows no metric): newest first; as the first
    columns, a flow run's summary (its best accuracy and macro-F1, each branch's accuracy, the champion's version)
    and, for its strategy runs, unfolded, the other headline metrics; then dataset and source.

    This is the UI's own record of a shared view, the experiment tag its Share button writes; it cannot unfold runs.
    """
    metrics = ["accuracy", "macro_f1", *(f"{branch}_accuracy" for branch in branches), "champion_version",
               *(name for name in HEADLINE_METRICS if name not in ("accuracy", "macro_f1"))]
    columns = [*(f"metrics.`{name}`" for name in metrics), "attributes.`Dataset`", "attributes.`Source`"]
    view = {"orderByKey": "attributes.start_time", "orderByAsc": False, "selectedColumns": columns,
            "columnOrder": columns}
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{RUNS_VIEW}", json.dumps(view))


def run_location(run) -> str:
    """Where to open MLflow run `run`: its page on the tracking server, or, with a local store, its artifact folder."""
    if url := server_url():
        return f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    uri = run.info.artifact_uri
    return local_file_uri_to_path(uri) if uri.startswith("file:") else uri


def configure_mlflow() -> MlflowClient:
    """Point MLflow's tracking and registry at `tracking_uri()` and return a client for it."""
    uri = tracking_uri()
    if database := sqlite_file(uri):
        database.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created on first use as a classic ML experiment (with a SQLite store, artifacts
    go beside the database); one without a kind is given it, so the UI does not ask."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        database = sqlite_file(tracking_uri())
        location = (database.resolve().parent / "artifacts").as_uri() if database else None
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


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
    metrics: dict[str, float]  # vitflow's names (test_accuracy, train_seconds, ...), not the logged ones
    model: str  # the pretrained model's short name (`vitflow.config.model_label`)


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"epochs": 3}} -> {"train.epochs": "3"}, for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _now_ms() -> int:
    return int(time.time() * 1000)


def log_values(client: MlflowClient, run_id: str, params: dict[str, str] | None = None,
               metrics: dict[str, float] | None = None) -> None:
    """Log params and metrics in as few calls as MLflow's batch limits allow."""
    now = _now_ms()
    entries = [Metric(key, float(value), now, 0) for key, value in (metrics or {}).items()]
    params_list = [Param(key, value) for key, value in (params or {}).items()]
    for start in range(0, max(len(entries), len(params_list)), 100):
        client.log_batch(run_id, metrics=entries[start:start + 100], params=params_list[start:start + 100])


def run_metrics(evaluation: EvalResult, train: TrainResult) -> dict[str, float]:
    """A strategy run's final metrics under their logged names: the headline ones, then `test/` per class,
    `model/` sizes and `train/` throughput."""
    scores = evaluation.metrics
    per_class = {f"test/{key.removeprefix('test_')}": value for key, value in scores.items()
                 if key.startswith("test_") and key not in ("test_accuracy", "test_macro_f1")}
    return {"accuracy": scores["test_accuracy"], "macro_f1": scores["test_macro_f1"], "best_epoch": train.best_epoch,
            "fit_seconds": train.train_seconds, "latency_ms": scores["latency_ms_per_image"], **per_class,
            "model/trainable_params": train.trainable_params, "model/total_params": train.total_params,
            "train/images_per_second": train.images_per_second, "train/peak_rss_mb": train.peak_rss_mb}


def epoch_metrics(row: dict) -> dict[str, float]:
    """An epoch's history row under its logged names: train_loss -> train/loss, val_accuracy -> val/accuracy."""
    return {key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else f"train/{key}": value
            for key, value in row.items() if key != "epoch"}


class LiveMetrics(TrainingObserver):
    """Logs a training to its run as it happens: each optimizer step's loss and learning rates (`step/`, at the
    update's number) and each epoch's train and val scores (`train/`, `val/`, at the epoch's number).

    Steps are sent together, at most every `every_seconds` and at each epoch's end, so logging stays cheap. When the
    tracking server cannot be reached, live logging stops and the training goes on; `finish` sends the rest.
    """

    def __init__(self, client: MlflowClient, run_id: str, every_seconds: float = 5.0):
        self.client, self.run_id, self.every_seconds = client, run_id, every_seconds
        self.pending: list[Metric] = []
        self.epochs_seen: set[int] = set()
        self.sent_at = time.monotonic()
        self.live = True

    def step(self, step: int, values: dict[str, float]) -> None:
        now = _now_ms()
        self.pending += [Metric(f"step/{key}", float(value), now, step) for key, value in values.items()]
        if time.monotonic() - self.sent_at >= self.every_seconds:
            self._send_live()

    def epoch(self, row: dict) -> None:
        self.epochs_seen.add(row["epoch"])
        self._add_epoch(row)
        self._send_live()

    def finish(self, history: list[dict]) -> None:
        """Add the epochs of the finished training's `history` not seen here (all of a reused training, the first
        ones of a resumed one), tag the run with how it came about (`training`: trained, resumed or reused), and
        send what is pending."""
        missed = [row for row in history if row["epoch"] not in self.epochs_seen]
        for row in missed:
            self._add_epoch(row)
        self.client.set_tag(self.run_id, "training",
                            "reused" if not self.epochs_seen else "resumed" if missed else "trained")
        self.flush()

    def flush(self) -> None:
        while self.pending:
            sent = self.pending[:100]
            self.client.log_batch(self.run_id, metrics=sent)
            del self.pending[:len(sent)]

    def _add_epoch(self, row: dict) -> None:
        now = _now_ms()
        self.pending += [Metric(key, float(value), now, row["epoch"]) for key, value in epoch_metrics(row).items()]

    def _send_live(self) -> None:
        self.sent_at = time.monotonic()
        if not self.live:
            return
        try:
            self.flush()
        except Exception as error:  # the training matters more than watching it
            self.live = False
            log.warning("live logging to MLflow run %s stopped (%s); the rest is logged when the training ends",
                        self.run_id, (str(error) or type(error).__name__).splitlines()[0])


@contextmanager
def live_training(client: MlflowClient, run_id: str) -> Iterator[LiveMetrics]:
    """A `LiveMetrics` for run `run_id`. When the training fails, what it measured until then is sent, quietly:
    the failure is what to report."""
    observer = LiveMetrics(client, run_id)
    try:
        yield observer
    except BaseException:
        with suppress(Exception):
            observer.flush()
        raise


@contextmanager
def system_metrics(run_id: str, every_seconds: float = 5.0) -> Iterator[None]:
    """Meanwhile, sample the machine's CPU, memory, disk and network use (and NVIDIA GPUs', where nvidia-ml-py is
    installed) into run `run_id`'s `system/` metrics, as `mlflow.start_run(log_system_metrics=True)` does."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=every_seconds, tracking_uri=tracking_uri())
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def log_dataset(client: MlflowClient, run_id: str, manifest_csv: str, data_version: DataVersion) -> None:
    """The manifest (one row per image) as the run's dataset input: named after the data, the DVC hash as its digest
    (MLflow keeps 36 characters, so "content-" is dropped), the manifest file as its source."""
    from mlflow.data import from_pandas
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = from_pandas(pd.read_csv(manifest_csv), source=manifest_csv, targets="label",
                          name=Path(data_version.path).name, digest=data_version.hash.removeprefix("content-"))
    client.log_inputs(run_id, [DatasetInput(Dataset(**dataset.to_dict()),
                                            [InputTag(MLFLOW_DATASET_CONTEXT, "training")])])


def start_parent_run(client: MlflowClient, experiment_id: str, run_name: str, params: dict,
                     tags: dict[str, str]) -> str:
    """Create the flow run's parent run with all params and the data/code version tags; return its id."""
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    log_values(client, run.info.run_id, params=flatten(params))
    return run.info.run_id


def start_strategy_run(client: MlflowClient, tracking: TrackingStart, model_source: str, strategy: str,
                       settings: dict, params: dict, manifest_csv: str, data_version: DataVersion) -> str:
    """Create the nested run of model `model_source` under strategy `strategy` before it trains, with its params (its
    own `settings`, the model and the preprocessing; the parent run has every setting), tags, dataset and
    description; returns its id."""
    model = model_label(model_source)
    tags = {**tracking.tags, "model_source": model_source, "model": model}
    note = strategy_run_note(strategy, tags, {}, "training")
    run = client.create_run(tracking.experiment_id, run_name=tracking.run_name(model, strategy),
                            tags={**tags, MLFLOW_PARENT_RUN_ID: tracking.parent_run_id, "strategy": strategy,
                                  MLFLOW_RUN_NOTE: note})
    shared = {"model": {**params["model"], "source": model_source}, "preprocess": params["preprocess"]}
    log_values(client, run.info.run_id, params={**flatten({**shared, "train": settings}), "strategy": strategy})
    log_dataset(client, run.info.run_id, manifest_csv, data_version)
    return run.info.run_id


def log_strategy_run(client: MlflowClient, tracking: TrackingStart, run_id: str, model_source: str, train: TrainResult,
                     evaluation: EvalResult, manifest_csv: str, cache_dir: str, model_name: str) -> RegisteredVersion:
    """The strategy run's test metrics, reports, manifest and model (with an example request from the cache's test
    split), registered as a version of `model_name` with a model card; `model_source` is what it fine-tuned.

    A training already registered (the same `training_key`: data, settings and code) is not registered again:
    the run notes the version it reuses (`model_version`).
    """
    log_values(client, run_id, metrics=run_metrics(evaluation, train))
    client.log_batch(run_id, tags=[RunTag(f"train_{name}", getattr(train, name))  # what `auto` resolved to
                                   for name in ("device", "precision", "attention")])
    for path in [*evaluation.artifacts, manifest_csv]:
        client.log_artifact(run_id, path)
    key = training_key(train.model_dir)
    registered = client.search_model_versions(f"name = '{model_name}' and tags.training_key = '{key}'")
    if registered:
        version = min(registered, key=lambda found: int(found.version))
    else:
        model_info = log_pyfunc_model(run_id, "model", train.model_dir, {"precision": "fp32"}, input_example(cache_dir))
        sidecar = read_sidecar(train.model_dir)
        version_tags = {"strategy": train.strategy, "data_version": tracking.tags["data_version"],
                        "model_source": model_source, "labels": json.dumps(sidecar["labels"]),
                        "image_size": str(sidecar["data_config"]["image_size"]), "training_key": key,
                        **{name: f"{evaluation.metrics[name]:.6g}" for name in ("test_accuracy", "test_macro_f1")}}
        version = register(client, model_name, model_info, version_tags)
    client.set_tag(run_id, "model_version", str(version.version))
    metrics = {**evaluation.metrics, "best_epoch": train.best_epoch, "trainable_params": train.trainable_params,
               "total_params": train.total_params, "train_seconds": train.train_seconds,
               "train_images_per_second": train.images_per_second, "peak_rss_mb": train.peak_rss_mb}
    return RegisteredVersion(train.strategy, run_id, version.version, metrics, model_label(model_source))


def register(client: MlflowClient, model_name: str, model_info, tags: dict[str, str]):
    """Register the logged model `model_info` as a new version of `model_name` (created if need be), with its model
    card; `mlflow.register_model` would do the same but print what it did."""
    try:
        client.create_registered_model(model_name)
    except MlflowException as error:  # it exists: from an earlier run, or another strategy's branch made it
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(model_name, model_info.model_uri, run_id=model_info.run_id, tags=tags,
                                          model_id=model_info.model_id)
    refresh_model_card(client, model_name, version.version)
    return version


def finish_strategy_run(client: MlflowClient, run_id: str, model_name: str, version: int | str) -> None:
    """Describe the strategy run by its headline metrics and registered version, and end it as finished."""
    run = client.get_run(run_id)
    note = strategy_run_note(run.data.tags["strategy"], run.data.tags, run.data.metrics,
                             run.data.tags.get("training", "trained"), f"{model_name} v{version}")
    client.set_tag(run_id, MLFLOW_RUN_NOTE, note)
    client.set_terminated(run_id)


def refresh_model_card(client: MlflowClient, model_name: str, version: int | str) -> None:
    """Write version `version`'s description: its model card (`vitflow.cards.model_card`), from its tags and
    the run that logged it."""
    found = client.get_model_version(model_name, str(version))
    run = client.get_run(found.run_id) if found.run_id else None
    card = model_card(model_name, found.version, found.tags, found.run_id, run.data.metrics if run else {},
                      run.data.tags if run else {})
    client.update_model_version(model_name, found.version, description=card)


def training_key(model_dir: str) -> str:
    """"<fingerprint>/<strategy>" of a training's output folder (see `vitflow.identity.training_dir`)."""
    return "/".join(Path(model_dir).parts[-3:-1])


def input_example(cache_dir: str) -> pd.DataFrame:
    """A request the served model takes: one test image of the cache, PNG-encoded, in the column `image`."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(load_split(cache_dir, "test").images[0].permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return pd.DataFrame({"image": [buffer.getvalue()]})


def log_pyfunc_model(run_id: str, name: str, model_dir: str, tags: dict[str, str],
                     example: pd.DataFrame | None = None):
    """Log the checkpoint or export in `model_dir` as an MLflow pyfunc model (from code) in run `run_id` and its
    experiment, with `example` as its input example (MLflow checks the model answers it).

    Through `Model.log` with the run's id: `mlflow.start_run` would mark the run finished when left.
    """
    from mlflow.models import Model

    experiment_id = MlflowClient(tracking_uri()).get_run(run_id).info.experiment_id
    logged = mlflow.initialize_logged_model(name, source_run_id=run_id, tags=tags, experiment_id=experiment_id)
    return Model.log(artifact_path=None, flavor=mlflow.pyfunc, name=name, run_id=run_id, model_id=logged.model_id,
                     python_model=str(PROJECT_ROOT / "vitflow" / "mlflow_model.py"), artifacts={"model_dir": model_dir},
                     code_paths=[str(PROJECT_ROOT / "vitflow")], signature=SIGNATURE, input_example=example,
                     pip_requirements=serving_requirements())


def log_exports(client: MlflowClient, run_id: str, records: list[dict], cache_dir: str) -> None:
    """Each reduced-precision export becomes its own model `model-<precision>` in the strategy's run, tagged with
    its precision; its agreement with FP32 is logged as `precision/<precision>_...` metrics."""
    example = input_example(cache_dir) if records else None
    for record in records:
        precision = record["precision"]
        log_values(client, run_id, metrics={f"precision/{precision}_{key}": record[key] for key in
                                            ("top1_agreement", "max_abs_logit_diff", "accuracy", "size_ratio_vs_fp32")})
        client.set_tag(run_id, f"{precision}_compute", record["compute"])
        log_pyfunc_model(run_id, f"model-{precision}", record["path"],
                         {"precision": precision, "compute": record["compute"],
                          "top1_agreement": f"{record['top1_agreement']:.6g}"}, example)


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
    name: str  # "{model}-{strategy}-<data version>"
    closed: list[ClosedRun]  # abandoned runs this start closed

    def run_name(self, model: str, strategy: str) -> str:
        return self.name.format(model=model, strategy=strategy)


def current_user() -> str:
    """Who runs vitflow, for MLflow's "Created by" and the champion history."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "unknown user"


def run_tags(data_version: DataVersion, model_source: str, owner: str) -> dict[str, str]:
    """Which data, model and code a run used, and which process runs it, as MLflow tags (with MLflow's own source,
    commit and user tags, which its UI shows as Source and Created by)."""
    tags = {"data_version": data_version.hash, "data_dirty": str(data_version.dirty).lower(),
            "data_tracked": str(data_version.tracked).lower(), "model_source": model_source, **git_state(),
            "prefect.flow_run_id": owner, "vitflow.pid": str(os.getpid()), "vitflow.host": socket.gethostname()}
    return {**tags, MLFLOW_GIT_COMMIT: tags["git_commit"], MLFLOW_SOURCE_TYPE: "LOCAL", MLFLOW_USER: current_user(),
            MLFLOW_SOURCE_NAME: str(PROJECT_ROOT / "flows" / "retrain.py")}


def start_tracking(settings: MlflowConfig, params: dict, data_version: DataVersion, model_sources: list[str],
                   force: bool, owner: str) -> TrackingStart:
    """Create the parent run, or, when data, params and code match a finished run and not `force`,
    a finished run that records there was nothing to do. Only parent runs carry `run_fingerprint`.

    Two runs with the same fingerprint do not run at once: the second waits for the first (a lock named by
    the fingerprint, held by `owner` until `locks.release_all(owner)` or its process ends), then finds it
    finished. Runs left RUNNING by a process that is gone are closed as KILLED first.
    """
    fingerprint = run_fingerprint(data_version.hash, params)
    locks.acquire(work_dir() / "locks" / f"{fingerprint}.lock", owner, settings.lock_wait_minutes * 60,
                  "a run with the same data, params and code")
    models = [model_label(source) for source in model_sources]
    run_name = f"retrain-{'+'.join(models)}-{data_version.short}"
    tags = run_tags(data_version, ", ".join(model_sources), owner)
    parent_tags = {**tags, "run_fingerprint": fingerprint}
    with tracking_server_errors():
        client = configure_mlflow()
        experiment_id = ensure_experiment(client, settings.experiment)
        closed = close_abandoned_runs(client, experiment_id, settings.stale_run_hours)
        previous = None if force else find_finished_run(client, experiment_id, fingerprint)
        if previous is None:
            strategies = params["train"]["strategies"]
            note = (f"Retraining {', '.join(f'`{model}`' for model in models)} on data `{data_version.short}`: "
                    f"{', '.join(strategies)}.")
            run_id = start_parent_run(client, experiment_id, run_name, params, {**parent_tags, MLFLOW_RUN_NOTE: note})
            share_runs_view(client, experiment_id,
                            [branch_label(model, strategy, models) for model in models for strategy in strategies])
        else:
            note = f"Nothing to do: data, params and code match run `{previous}`."
            run = client.create_run(experiment_id, run_name=f"{run_name}-nothing-to-do",
                                    tags={**parent_tags, "nothing_to_do": "true", "same_as_run": previous,
                                          MLFLOW_RUN_NOTE: note})
            client.set_terminated(run.info.run_id)
            run_id = run.info.run_id
    return TrackingStart(experiment_id, run_id, previous, tags, f"{{model}}-{{strategy}}-{data_version.short}",
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
            refresh_model_card(client, version.name, version.version)


def log_run_artifact(client: MlflowClient, run_id: str, path: str, folder: str) -> tuple[str, str]:
    """Log the file at `path` under `folder` in run `run_id`; returns (its artifact URI, the run's strategy or name)."""
    client.log_artifact(run_id, path, folder)
    run = client.get_run(run_id)
    name = run.data.tags.get("strategy") or run.info.run_name or run_id
    return f"{run.info.artifact_uri}/{folder}/{Path(path).name}", name

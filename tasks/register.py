"""Record runs in MLflow, register every strategy's model, and decide promotion by aliases.

One parent run per flow run, one nested run per strategy. Each strategy's model becomes a
version of one registered model. The best new version gets the alias `challenger`; it takes
`champion` only when there is none yet, or when it beats the champion on the test split of
the same data version by more than `registry.min_improvement`.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import requests
from mlflow.tracking import MlflowClient
from prefect import task

from tasks.evaluate import EvalResult
from tasks.registry_ops import champion_version, promote_version
from tasks.train import TrainResult
from vitflow import PROJECT_ROOT, WORK_DIR
from vitflow.errors import VitflowError
from vitflow.serving import SIGNATURE, load_logged_model
from vitflow.tracking import configure_mlflow, ensure_experiment, tracking_uri

CHALLENGER = "challenger"
SERVING_PACKAGES = ("torch", "torchvision", "timm", "transformers", "safetensors", "pillow", "numpy", "pandas",
                    "onnxruntime")
# Prefect retries of the tasks that talk to MLflow, on top of MLflow's own HTTP retries
# (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR); only an unreachable server is retried.
RETRY_DELAYS_SECONDS = [2, 5, 15]


class TrackingServerUnreachable(VitflowError):
    """The MLflow tracking server did not answer, even after retries."""


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
            f"trained models are kept in {WORK_DIR}; run `vitflow run` again when it is back") from None


def retry_if_unreachable(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only when the tracking server could not be reached."""
    return isinstance(state.result(raise_on_failure=False), TrackingServerUnreachable)


@dataclass
class RegisteredVersion:
    strategy: str
    run_id: str
    version: str
    metrics: dict[str, float]


@dataclass
class PromotionDecision:
    challenger: str  # model version
    champion_before: str | None
    promoted: bool
    reason: str


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"epochs": 3}} -> {"train.epochs": "3"}, for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def start_parent_run(client: MlflowClient, experiment_id: str, run_name: str, params: dict,
                     tags: dict[str, str]) -> str:
    """Create the flow run's parent run with all params and the data/code version tags; return its id."""
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    for key, value in flatten(params).items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def log_strategy_run(client: MlflowClient, experiment_id: str, parent_run_id: str, run_name: str,
                     train: TrainResult, evaluation: EvalResult, params: dict, tags: dict[str, str],
                     manifest_csv: str, model_name: str) -> RegisteredVersion:
    """One nested run: params, per-epoch history, test metrics, artifacts, the model and its registry version."""
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={**tags, "mlflow.parentRunId": parent_run_id, "strategy": train.strategy})
    run_id = run.info.run_id
    for key, value in {**flatten(params), "strategy": train.strategy}.items():
        client.log_param(run_id, key, value)
    for row in train.history:
        for key in ("train_loss", "val_loss", "val_accuracy"):
            client.log_metric(run_id, key, row[key], step=row["epoch"])
    metrics = {**evaluation.metrics, "trainable_params": train.trainable_params, "total_params": train.total_params,
               "train_seconds": train.train_seconds, "train_images_per_second": train.images_per_second,
               "peak_rss_mb": train.peak_rss_mb}
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for path in [*evaluation.artifacts, manifest_csv]:
        client.log_artifact(run_id, path)
    model_info = log_pyfunc_model(run_id, "model", train.model_dir, {"precision": "fp32"})
    version_tags = {**tags, "strategy": train.strategy, "run_id": run_id,
                    **{key: f"{metrics[key]:.6g}" for key in ("test_accuracy", "test_macro_f1")}}
    version = mlflow.register_model(model_info.model_uri, model_name, tags=version_tags)
    client.set_terminated(run_id)
    return RegisteredVersion(train.strategy, run_id, version.version, metrics)


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
        for key in ("top1_agreement", "max_abs_logit_diff", "accuracy", "size_ratio_vs_fp32"):
            client.log_metric(run_id, f"{precision}_{key}", record[key])
        client.set_tag(run_id, f"{precision}_compute", record["compute"])
        log_pyfunc_model(run_id, f"model-{precision}", record["path"],
                         {"precision": precision, "compute": record["compute"],
                          "top1_agreement": f"{record['top1_agreement']:.6g}"})


def exported_model_uri(client: MlflowClient, run_id: str, precision: str) -> str:
    """The `models:/<id>` URI of run `run_id`'s export at `precision`."""
    name = "model" if precision == "fp32" else f"model-{precision}"
    experiment_id = client.get_run(run_id).info.experiment_id
    found = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list",
                                        filter_string=f"name = '{name}' AND source_run_id = '{run_id}'")
    if not found:
        raise VitflowError(f"run {run_id} has no {precision} export; add it to export.precisions in params.yaml "
                           "and run `vitflow run --force`")
    return f"models:/{found[0].model_id}"


def serving_requirements() -> list[str]:
    """Pinned versions of what loading the model needs, taken from this environment."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in SERVING_PACKAGES]


def decide_promotion(challenger_score: float, champion_score: float | None, min_improvement: float) -> tuple[bool, str]:
    """Whether the challenger takes `champion`, and why (the scores are on the same test split)."""
    if champion_score is None:
        return True, "no champion yet"
    if challenger_score > champion_score + min_improvement:
        return True, f"beats the champion: {challenger_score:.4f} > {champion_score:.4f} + {min_improvement}"
    return False, f"does not beat the champion: {challenger_score:.4f} <= {champion_score:.4f} + {min_improvement}"


def promote(client: MlflowClient, model_name: str, candidates: list[RegisteredVersion], metric: str,
            min_improvement: float, data_version: str, champion_score_on_current_test) -> PromotionDecision:
    """Give the best candidate `challenger`, and `champion` when `decide_promotion` says so.

    `champion_score_on_current_test(version)` scores the current champion on this flow run's
    test split; it is called only when the champion was evaluated on another data version.
    """
    key = f"test_{metric}"
    best = max(candidates, key=lambda candidate: candidate.metrics[key])
    client.set_registered_model_alias(model_name, CHALLENGER, best.version)
    current = champion_version(client, model_name)
    champion_score = None
    if current is not None:
        if current.tags.get("data_version") == data_version and key in current.tags:
            champion_score = float(current.tags[key])
        else:
            champion_score = champion_score_on_current_test(current)
    promoted, reason = decide_promotion(best.metrics[key], champion_score, min_improvement)
    if promoted:
        # force: the score comparison above already covers a champion from another data version
        promote_version(client, model_name, best.version, reason, "retrain flow", force=True)
    for candidate in candidates:
        if candidate is best:
            decision, why = ("promoted to champion" if promoted else "challenger, not promoted"), reason
        else:
            decision, why = "not selected", f"{key} {candidate.metrics[key]:.4f} below the best new version"
        client.set_model_version_tag(model_name, candidate.version, "decision", decision)
        client.set_model_version_tag(model_name, candidate.version, "decision_reason", why)
    return PromotionDecision(challenger=best.version, champion_before=current.version if current else None,
                             promoted=promoted, reason=reason)


def find_finished_run(client: MlflowClient, experiment_id: str, fingerprint: str) -> str | None:
    """The flow run that trained with this fingerprint (same data, params and code) and finished, or None.

    A nothing-to-do run points at the run it matched, so a chain of them still names the one that trained.
    """
    runs = client.search_runs([experiment_id], f"tags.run_fingerprint = '{fingerprint}' and "
                              "attributes.status = 'FINISHED'", max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].data.tags.get("same_as_run", runs[0].info.run_id) if runs else None


@dataclass
class TrackingStart:
    experiment_id: str
    parent_run_id: str
    same_as_run: str | None  # set when an earlier finished run had the same data, params and code


@task(name="start-tracking", retries=len(RETRY_DELAYS_SECONDS), retry_delay_seconds=RETRY_DELAYS_SECONDS,
      retry_condition_fn=retry_if_unreachable)
def start_tracking_task(experiment: str, run_name: str, params: dict, tags: dict[str, str], fingerprint: str,
                        force: bool) -> TrackingStart:
    """Create the parent run, or, when nothing changed since a finished run and not `force`,
    a finished run that records there was nothing to do. Only parent runs carry `run_fingerprint`."""
    with tracking_server_errors():
        client = configure_mlflow()
        experiment_id = ensure_experiment(client, experiment)
        previous = None if force else find_finished_run(client, experiment_id, fingerprint)
        tags = {**tags, "run_fingerprint": fingerprint}
        if previous is None:
            return TrackingStart(experiment_id, start_parent_run(client, experiment_id, run_name, params, tags), None)
        run = client.create_run(experiment_id, run_name=f"{run_name}-nothing-to-do",
                                tags={**tags, "nothing_to_do": "true", "same_as_run": previous})
        client.set_terminated(run.info.run_id)
        return TrackingStart(experiment_id, run.info.run_id, previous)


@task(name="log-and-register", retries=len(RETRY_DELAYS_SECONDS), retry_delay_seconds=RETRY_DELAYS_SECONDS,
      retry_condition_fn=retry_if_unreachable)
def log_strategy_task(experiment_id: str, parent_run_id: str, run_name: str, train: TrainResult,
                      evaluation: EvalResult, params: dict, tags: dict[str, str], manifest_csv: str,
                      model_name: str) -> RegisteredVersion:
    with tracking_server_errors():
        return log_strategy_run(configure_mlflow(), experiment_id, parent_run_id, run_name, train, evaluation,
                                params, tags, manifest_csv, model_name)


@task(name="log-exports", retries=len(RETRY_DELAYS_SECONDS), retry_delay_seconds=RETRY_DELAYS_SECONDS,
      retry_condition_fn=retry_if_unreachable)
def log_exports_task(run_id: str, records: list[dict]) -> None:
    with tracking_server_errors():
        log_exports(configure_mlflow(), run_id, records)


@task(name="promote", retries=len(RETRY_DELAYS_SECONDS), retry_delay_seconds=RETRY_DELAYS_SECONDS,
      retry_condition_fn=retry_if_unreachable)
def promote_task(parent_run_id: str, model_name: str, candidates: list[RegisteredVersion], metric: str,
                 min_improvement: float, data_version: str, cache_file: str, eval_batch_size: int,
                 work_dir: str) -> PromotionDecision:
    """Promote by the rule, re-scoring an older champion on this run's test split when needed."""
    from tasks.evaluate import evaluate_model
    from tasks.preprocess import load_split

    client = configure_mlflow()

    def champion_score_on_current_test(version) -> float:
        model = load_logged_model(f"models:/{model_name}/{version.version}")
        result = evaluate_model(model, load_split(cache_file, "test"), Path(work_dir) / "champion-eval",
                                eval_batch_size)
        return result.metrics[f"test_{metric}"]

    with tracking_server_errors():
        decision = promote(client, model_name, candidates, metric, min_improvement, data_version,
                           champion_score_on_current_test)
        client.set_tag(parent_run_id, "promotion", f"v{decision.challenger} "
                       f"{'promoted' if decision.promoted else 'not promoted'}: {decision.reason}")
        client.set_terminated(parent_run_id)
    return decision

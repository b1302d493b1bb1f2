"""The fault battery: `vitflow run` killed with SIGKILL at each stage, and two identical runs started together.

Every run is a real `vitflow run` process in its own process group, on the tiny model, against the session's
Prefect server, with a work directory and SQLite MLflow store under tmp_path. After the faults, the records
must be true: no run left RUNNING (in MLflow or in Prefect), no duplicate model version, and a champion history
with one entry per champion move.
"""

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from servers import free_port, mlflow_server_command, running, start, stop, tail, wait_healthy

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-c", "import sys; from vitflow.cli import main; sys.exit(main())", "run"]


def overrides(pneumonia_folder: Path, tiny_hf_model: Path, name: str) -> list[str]:
    """One strategy, long enough to be killed while it trains; int8 export, slow enough to be killed in."""
    settings = [f"data.path={pneumonia_folder}", f"model.source={tiny_hf_model}", "preprocess.image_size=null",
                "train.strategies=[full]", "train.epochs=20", "train.augment=false", "train.lr_backbone=3e-3",
                "train.lr_head=3e-3", "export.precisions=[fp16,int8]", f"registry.model_name={name}",
                f"mlflow.experiment={name}"]
    return [arg for setting in settings for arg in ("--set", setting)]


def environment(tmp_path: Path, prefect_api: str) -> dict[str, str]:
    return {**os.environ, "VITFLOW_WORK_DIR": str(tmp_path / "work"), "PREFECT_API_URL": prefect_api,
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}


def wait_until(condition: Callable[[], bool], process, log: Path, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended ({process.returncode}) before {what}:\n{tail(log)}")
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout:.0f} s:\n{tail(log)}")


def kill_when(condition: Callable[[], bool], what: str, tmp_path: Path, prefect_api: str, args: list[str],
              log_name: str) -> None:
    """Start a run and SIGKILL its whole process group once `condition()` holds."""
    log = tmp_path / log_name
    process = start([*CLI, *args], environment(tmp_path, prefect_api), log)
    try:
        wait_until(condition, process, log, what)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    assert process.returncode == -signal.SIGKILL


def begin(tmp_path: Path, prefect_api: str, args: list[str], log_name: str):
    log = tmp_path / log_name
    return start([*CLI, *args], environment(tmp_path, prefect_api), log), log


def prefect_states(prefect_api: str, flow_run_ids: list[str]) -> list[str]:
    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        return [client.read_flow_run(flow_run_id).state.type.value for flow_run_id in flow_run_ids]


def test_runs_killed_in_training_registration_and_export_leave_true_records(pneumonia_folder, tiny_hf_model,
                                                                            prefect_api, tmp_path):
    name = "faults"
    args = overrides(pneumonia_folder, tiny_hf_model, name)
    client = MlflowClient(*[f"sqlite:///{tmp_path / 'mlflow.db'}"] * 2)
    models = tmp_path / "work" / "models"

    kill_when(lambda: "epoch 2/20" in (tmp_path / "1.log").read_text(errors="replace"), "training", tmp_path,
              prefect_api, args, "1.log")
    assert not list(models.glob("*/full/result.json"))  # killed before the training finished
    kill_when(lambda: _versions(client, name), "a registered version", tmp_path, prefect_api, args, "2.log")
    assert len(_versions(client, name)) == 1
    kill_when(lambda: any(models.glob("*/full/exports/*")), "an export", tmp_path, prefect_api, args, "3.log")

    process, log = begin(tmp_path, prefect_api, args, "4.log")
    assert process.wait(300) == 0, tail(log)
    assert log.read_text().count("closed MLflow run") >= 1  # what the kills left was closed, and said so

    experiment_id = client.get_experiment_by_name(name).experiment_id
    runs = client.search_runs([experiment_id])
    assert [run.info.run_id for run in runs if run.info.status == "RUNNING"] == []
    parents = sorted((run for run in runs if "run_fingerprint" in run.data.tags), key=lambda run: run.info.start_time)
    assert [run.info.status for run in parents] == ["KILLED", "KILLED", "KILLED", "FINISHED"]
    assert all("is gone" in run.data.tags["end_reason"] for run in parents[:3])
    [version] = _versions(client, name)  # the killed runs' registration was reused, never repeated
    assert version.tags["decision"] == "promoted to champion"
    history = json.loads(client.get_registered_model(name).tags["champion_history"])
    assert [(entry["version"], entry["previous"]) for entry in history] == [(str(version.version), None)]
    flow_runs = [run.data.tags["prefect.flow_run_id"] for run in parents]
    assert prefect_states(prefect_api, flow_runs) == ["CRASHED", "CRASHED", "CRASHED", "COMPLETED"]


def test_two_identical_runs_started_together_train_and_register_once(pneumonia_folder, tiny_hf_model, prefect_api,
                                                                     tmp_path):
    name = "together"
    args = overrides(pneumonia_folder, tiny_hf_model, name)
    first = begin(tmp_path, prefect_api, args, "a.log")
    second = begin(tmp_path, prefect_api, args, "b.log")
    try:
        for process, log in (first, second):
            assert process.wait(400) == 0, tail(log)
    finally:
        for process, _ in (first, second):
            stop(process)

    client = MlflowClient(*[f"sqlite:///{tmp_path / 'mlflow.db'}"] * 2)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    parents = [run for run in runs if "run_fingerprint" in run.data.tags]
    assert sorted(run.data.tags.get("nothing_to_do", "trained") for run in parents) == ["trained", "true"]
    trained = next(run for run in parents if "nothing_to_do" not in run.data.tags)
    skipped = next(run for run in parents if "nothing_to_do" in run.data.tags)
    assert skipped.data.tags["same_as_run"] == trained.info.run_id
    assert len(_versions(client, name)) == 1
    assert all(run.info.status == "FINISHED" for run in runs)
    assert any("nothing to do" in log.read_text() for _, log in (first, second))


def test_a_tracking_server_stopped_mid_run_and_restarted(pneumonia_folder, tiny_hf_model, prefect_api, tmp_path):
    """The MLflow server goes away while a strategy run is being logged: the run fails in one line; once the
    server is back, a re-run closes what the failed one left RUNNING and registers the training once."""
    name, root, port = "mid-run", tmp_path / "mlflow", free_port()
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    env = {**environment(tmp_path, prefect_api), "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
           "VITFLOW_TRACKING_RETRY_DELAYS": "0"}
    args = overrides(pneumonia_folder, tiny_hf_model, name)
    client = MlflowClient(uri, uri)
    server = start(mlflow_server_command(port, root), env, tmp_path / "mlflow-1.log")
    try:
        wait_healthy(f"{uri}/health", server, tmp_path / "mlflow-1.log")
        run = start([*CLI, *args], env, tmp_path / "1.log")
        wait_until(lambda: _strategy_runs(client, name), run, tmp_path / "1.log", "a strategy run")
    finally:
        stop(server)
    assert run.wait(300) == 3, tail(tmp_path / "1.log")
    errors = [line for line in (tmp_path / "1.log").read_text().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"MLflow tracking server at {uri} is unreachable" in errors[0]

    with running(mlflow_server_command(port, root), env, tmp_path / "mlflow-2.log", health_url=f"{uri}/health"):
        again = start([*CLI, *args], env, tmp_path / "2.log")
        assert again.wait(300) == 0, tail(tmp_path / "2.log")
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert [run.info.status for run in runs if run.info.status == "RUNNING"] == []
        parents = sorted((run for run in runs if "run_fingerprint" in run.data.tags),
                         key=lambda run: run.info.start_time)
        assert [run.info.status for run in parents] == ["KILLED", "FINISHED"]
        assert len(_versions(client, name)) == 1


def _strategy_runs(client: MlflowClient, name: str) -> list:
    try:
        experiment = client.get_experiment_by_name(name)
        return experiment and client.search_runs([experiment.experiment_id], "tags.strategy = 'full'")
    except Exception:  # the server is starting, or the experiment is being created
        return []


def _versions(client: MlflowClient, name: str) -> list:
    try:
        return client.search_model_versions(f"name = '{name}'")
    except Exception:  # the store is being created by the run
        return []

"""Against real servers: the retrain flow served on a cron schedule by a Prefect server, and runs
recorded on an MLflow tracking server that goes away and comes back.

Servers run as subprocesses on free ports of 127.0.0.1, with their own homes under tmp_path;
`tests/servers.py` starts them, waits until they answer and always stops them.
"""

import asyncio
import os
import re
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments import run_deployment
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, temporary_settings
from servers import free_port, mlflow_server_command, running, tail

import flows.retrain as retrain_module
import vitflow.tracking as tracking
from flows.retrain import retrain
from vitflow.cli import main
from vitflow.cli.ops import serve_command
from vitflow.errors import VitflowError
from vitflow.paths import PROJECT_ROOT, work_dir
from vitflow.tracking import configure_mlflow, tracking_uri

pytestmark = pytest.mark.slow
CRON, TIMEZONE = "0 3 * * 1", "Europe/Paris"
STRATEGIES = {"feature_extraction"}  # the cheapest one keeps these tests short; test_flow.py covers all three
SERVE = "import sys; from vitflow.cli import main; sys.exit(main())"  # `vitflow serve ...`


def tiny_overrides(pneumonia_folder: Path, tiny_hf_model: Path, name: str) -> list[str]:
    """The overrides of tests/test_flow.py at the tiny model's own size, with STRATEGIES and no exports;
    their own experiment and model name."""
    return [f"data.path={pneumonia_folder}", f"model.source={tiny_hf_model}", "preprocess.image_size=null",
            "train.epochs=6", "train.feature_extraction.epochs=20", "train.lr_backbone=3e-3", "train.lr_head=3e-3",
            "train.partial.blocks=1", "train.augment=false", f"train.strategies=[{','.join(sorted(STRATEGIES))}]",
            "export.precisions=[]", f"registry.model_name={name}", f"mlflow.experiment={name}"]


def strategy_runs(client: MlflowClient, experiment: str, parent_run_id: str) -> dict[str, object]:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {run.data.tags["strategy"]: run for run in children}


# --- Prefect: `vitflow serve` on a real Prefect server ---------------------------------------------------------

def read_deployment(api_url: str, name: str):
    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name(name)

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(read())


def trigger(api_url: str, name: str, log: Path):
    """Run the deployment now and wait for the served process to finish it; (flow run, seconds)."""
    start = time.monotonic()
    with temporary_settings({PREFECT_API_URL: api_url}):
        flow_run = run_deployment(name, timeout=300, poll_interval=1)
    assert flow_run.state.is_completed(), tail(log)
    return flow_run, time.monotonic() - start


def test_served_deployment_runs_on_schedule_survives_a_restart_and_skips_unchanged(prefect_api, pneumonia_folder,
                                                                                   tiny_hf_model, tmp_path):
    client = MlflowClient(tracking_uri(), tracking_uri())  # the session's SQLite store; served runs inherit it
    name = "served"
    overrides = tiny_overrides(pneumonia_folder, tiny_hf_model, name)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect"),
           "VITFLOW_WORK_DIR": str(tmp_path / "work"), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    serve = [sys.executable, "-c", SERVE, "serve", "--cron", CRON, "--timezone", TIMEZONE, "--name", name,
             *[arg for override in overrides for arg in ("--set", override)]]
    log = tmp_path / "serve.log"

    with running(serve, env, log, ready_line="is being served", timeout=120):
        deployment = read_deployment(prefect_api, f"retrain/{name}")
        assert not deployment.paused
        assert [(item.active, item.schedule.cron, item.schedule.timezone) for item in deployment.schedules] == [
            (True, CRON, TIMEZONE)]
        assert deployment.parameters["overrides"] == overrides and deployment.parameters["force"] is False
        first, first_seconds = trigger(prefect_api, f"retrain/{name}", log)
    assert read_deployment(prefect_api, f"retrain/{name}").paused  # stopping paused it (pause_on_shutdown)

    log.unlink()  # wait for this start's own "is being served"
    with running(serve, env, log, ready_line="is being served", timeout=120):
        assert not read_deployment(prefect_api, f"retrain/{name}").paused  # serving again resumed it
        second, second_seconds = trigger(prefect_api, f"retrain/{name}", log)

    print(f"served run: {first_seconds:.1f} s ({first.total_run_time.total_seconds():.1f} s running); "
          f"nothing-to-do run: {second_seconds:.1f} s ({second.total_run_time.total_seconds():.1f} s running)")
    # Nothing to do takes seconds; the rest of the wait is the served run's new process importing the flow's
    # dependencies (torch, transformers, MLflow), from ~15 s to a minute on two busy cores.
    assert second.total_run_time.total_seconds() < 30
    experiment_id = client.get_experiment_by_name(name).experiment_id
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time"])
    parents = [run for run in runs if "run_fingerprint" in run.data.tags]  # only parent runs carry it
    assert [run.data.tags.get("nothing_to_do") for run in parents] == [None, "true"]
    trained, skipped = parents
    assert skipped.data.tags["same_as_run"] == trained.info.run_id
    assert set(strategy_runs(client, name, trained.info.run_id)) == STRATEGIES
    assert len(client.search_model_versions(f"name='{name}'")) == len(STRATEGIES)


def test_prefect_yaml_describes_the_work_pool_deployment():
    """prefect.yaml passes the model `prefect deploy` reads it with, and names the flow, schedule and pool."""
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    config = PrefectYamlModel.model_validate(yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text()))
    [deployment] = config.deployments
    assert deployment.work_pool.name == "vitflow-pool"
    [schedule] = deployment.schedules
    CronSchedule(cron=schedule.cron, timezone=schedule.timezone)  # valid cron and timezone
    assert (schedule.cron, schedule.timezone) == (CRON, TIMEZONE)
    flow = load_flow_from_entrypoint(str(PROJECT_ROOT / deployment.entrypoint))
    assert flow.name == "retrain"
    assert set(deployment.parameters) <= set(flow.parameters.properties)


@pytest.mark.parametrize(("cron", "timezone", "message"), [
    ("61 3 * * 1", None, 'Invalid cron string: "61 3 * * 1"'),
    (CRON, "Mars/Olympus", 'Invalid timezone: "Mars/Olympus"'),
    (CRON, None, "serve needs a Prefect server"),
])
def test_serve_rejects_bad_schedules_and_a_missing_server(cron, timezone, message):
    args = Namespace(cron=cron, timezone=timezone, name="x", set=[], force=False,
                     params=str(PROJECT_ROOT / "params.yaml"))
    with pytest.raises(VitflowError, match=re.escape(message)):
        serve_command(args)


# --- MLflow: a tracking server that goes away and comes back ---------------------------------------------------

@pytest.fixture
def http_tracking(monkeypatch, prefect_api):
    """MLFLOW_TRACKING_URI set to a server on a free port (started by the test), flows run on the Prefect server;
    the session's stores afterwards."""
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        yield port
        APILogHandler().flush()  # send the flow runs' last logs while that server is up
    monkeypatch.undo()
    configure_mlflow()


def test_runs_survive_a_tracking_server_outage(http_tracking, monkeypatch, tmp_path, pneumonia_folder, tiny_hf_model,
                                               capsys):
    port, root = http_tracking, tmp_path / "mlflow"
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    name = "over-http"
    overrides = tiny_overrides(pneumonia_folder, tiny_hf_model, name)
    env = dict(os.environ)

    with running(mlflow_server_command(port, root), env, tmp_path / "mlflow.log", health_url=f"{uri}/health"):
        first = retrain(overrides=overrides)
        client = MlflowClient(uri, uri)
        runs = strategy_runs(client, name, first["parent_run_id"])
        assert set(runs) == STRATEGIES
        for run in runs.values():
            artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
            assert {"confusion_matrix.png", "classification_report.csv", "rollout"} <= artifacts
        assert len(client.search_model_versions(f"name='{name}'")) == len(STRATEGIES)
        assert client.get_model_version_by_alias(name, "champion").version == first["decision"].challenger
        assert list((root / "artifacts").rglob("MLmodel"))  # the server stored what the flow uploaded

    # The server is gone: MLflow retries each request once, Prefect retries the first task that needs the server
    # three times (without the delays, here), then the run fails with one line.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setattr(retrain_module, "start_tracking_task",
                        retrain_module.start_tracking_task.with_options(retry_delay_seconds=0))
    attempts = []  # when start-tracking tried to reach the server
    monkeypatch.setattr(tracking, "configure_mlflow", lambda: attempts.append(time.monotonic()) or configure_mlflow())
    capsys.readouterr()
    start = time.monotonic()
    assert main(["run", "--force", *[arg for override in overrides for arg in ("--set", override)]]) == 3
    seconds, retrying = time.monotonic() - start, time.monotonic() - attempts[0]
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: MLflow tracking server at {uri} is unreachable (connection failed after retries); "
                      f"trained models are kept in {work_dir()}; run `vitflow run` again when it is back"]
    assert len(attempts) == 1 + 3 + 1  # start-tracking and its three retries, then the failure hook ending runs
    print(f"failed run against the stopped server: {seconds:.1f} s, {retrying:.1f} s of it trying to reach it")
    assert retrying < 15 and seconds < 90

    # Back up on the same backend: a re-run reuses the trainings and the versions registered from them.
    with running(mlflow_server_command(port, root), env, tmp_path / "mlflow.log", health_url=f"{uri}/health"):
        again = retrain(overrides=overrides, force=True)
        train_seconds = {item.strategy: item.metrics["train_seconds"] for item in first["registered"]}
        assert {item.strategy: item.metrics["train_seconds"] for item in again["registered"]} == train_seconds
        assert {item.version for item in again["registered"]} == {item.version for item in first["registered"]}
        assert len(client.search_model_versions(f"name='{name}'")) == len(STRATEGIES)
        experiment_id = client.get_experiment_by_name(name).experiment_id
        assert client.search_runs([experiment_id], "attributes.status = 'RUNNING'") == []

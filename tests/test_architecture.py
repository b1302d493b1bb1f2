"""The shape of the code: what importing the library does, and what each registry makes pluggable."""

import json
import os
import subprocess
import sys

import pytest

from vitflow.config import TrainConfig, load_config
from vitflow.errors import VitflowError
from vitflow.paths import PROJECT_ROOT
from vitflow.training.strategies import STRATEGIES, resolve

LIBRARY = ["vitflow", "vitflow.config", "vitflow.data.manifest", "vitflow.data.cache", "vitflow.models",
           "vitflow.training.loop", "vitflow.evaluation", "vitflow.explain.heatmaps", "vitflow.export",
           "vitflow.tracking", "vitflow.registry", "vitflow.reporting", "vitflow.serving", "vitflow.loading",
           "vitflow.preflight", "vitflow.stages", "vitflow.devices", "vitflow.prediction"]


def test_importing_the_library_writes_nothing_and_sets_no_environment_variable(tmp_path):
    """As `mlflow models serve` loads a registered model: no Prefect home appears, os.environ is untouched."""
    work = tmp_path / "work"
    script = ("import json, os, sys; before = dict(os.environ); "
              f"[__import__(name) for name in {LIBRARY!r}]; "
              "print(json.dumps({'changed': sorted(k for k in set(before) | set(os.environ) "
              "if before.get(k) != os.environ.get(k)), 'prefect': 'prefect' in sys.modules}))")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["VITFLOW_WORK_DIR"] = str(work)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    set_by_mlflow_itself = {"_MLFLOW_TELEMETRY_SESSION_ID"}  # on its own import, whoever imports it
    assert set(report["changed"]) <= set_by_mlflow_itself and report["prefect"] is False
    assert not work.exists() and not list(tmp_path.iterdir())


def test_the_import_contracts_hold():
    """cli -> flows -> tasks -> library; the core imports neither Prefect nor MLflow; no cycles (import-linter)."""
    lint_imports = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    done = subprocess.run([lint_imports, "--no-cache"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


def test_every_registered_strategy_refuses_a_misspelt_setting_by_name():
    train = load_config().train
    for name in STRATEGIES:
        section = {**train.strategy_section(name), "lerning_rate": 1e-3}
        with pytest.raises(VitflowError, match=rf"unknown setting 'train\.{name}\.lerning_rate'"):
            resolve(TrainConfig(**{**train.model_dump(), name: section}), name)
        assert resolve(train, name).name == name  # and its own section as shipped is valid


def test_logging_a_model_prints_none_of_mlflows_notes(tiny_hf_model, tmp_path):
    """With the environment a command or flow sets up, MLflow's per-model notes stay out of the console."""
    script = f"""
from vitflow import environment
environment.set_up()
from vitflow.tracking import configure_mlflow, ensure_experiment, log_pyfunc_model
from vitflow.models import load_model
client = configure_mlflow()
run = client.create_run(ensure_experiment(client, "quiet"))
model_dir = load_model({str(tiny_hf_model)!r}, labels=["a", "b"]).save({str(tmp_path / "model")!r})
print(log_pyfunc_model(run.info.run_id, "model", str(model_dir), {{}}).model_uri)
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "VITFLOW_WORK_DIR": str(tmp_path / "work")}
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith("models:/")
    for note in ("uv_utils", "Failed to resolve installed pip version", "An input example was not provided"):
        assert note not in done.stderr, note

"""Where runs and models are recorded: MLflow's store, and the git state of the code.

By default MLflow writes to a SQLite store under `mlruns/` (artifacts beside it), so no
server is needed; set `MLFLOW_TRACKING_URI` to use a tracking server instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from vitflow import PROJECT_ROOT

MLRUNS_DIR = PROJECT_ROOT / "mlruns"


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


def git_state() -> dict[str, str]:
    """The commit the code runs from and whether the working tree has uncommitted changes."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def source_hash(paths: Iterable[str]) -> str:
    """Short hash of the contents of project files (paths relative to the project root)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.encode())
        digest.update((PROJECT_ROOT / path).read_bytes())
    return digest.hexdigest()[:12]


def run_fingerprint(data_version: str, params: dict) -> str:
    """What a retraining depends on: data version, every param and the project's code."""
    code = source_hash(str(path.relative_to(PROJECT_ROOT)) for folder in ("vitflow", "tasks", "flows")
                       for path in (PROJECT_ROOT / folder).glob("*.py"))
    payload = json.dumps([data_version, params, code], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]

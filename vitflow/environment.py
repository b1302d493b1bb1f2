"""The process environment a vitflow command or flow runs in: offline, quiet, with its homes in the project."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from vitflow.paths import work_dir


def set_up() -> None:
    """Turn off telemetry, MLflow's progress bars and notes a user cannot act on, and point Prefect's home into
    the work directory, unless already set.

    Called by the CLI and the flow packages when they start, before Prefect is imported; never at import
    of the library, so that a model loaded elsewhere (e.g. by `mlflow models serve`) writes nothing.
    """
    for name, value in {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PREFECT_HOME": str(work_dir() / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }.items():
        os.environ.setdefault(name, value)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level
    quiet_third_party_noise()


def quiet_third_party_noise() -> None:
    """MLflow's notes that a user of vitflow cannot act on, printed several times per logged model: how it
    found the uv project, that pip's version is unknown, that no input example was given."""
    for name in ("mlflow.utils.uv_utils", "mlflow.utils.environment"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)

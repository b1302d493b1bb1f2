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
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also transformers' bars while loading and saving weights
    }.items():
        os.environ.setdefault(name, value)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level
    quiet_third_party_noise()


def quiet_third_party_noise() -> None:
    """MLflow's notes that a user of vitflow cannot act on, several per run or logged model: how it found the uv
    project, that pip's version is unknown, that no input example was given, that it validates one, that it creates
    its tables, starts and stops sampling system metrics and has no GPU to sample, how it reads a dataset's source
    and schema."""
    for name in ("mlflow.utils.uv_utils", "mlflow.utils.environment"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("mlflow.pyfunc", "mlflow.store.db.utils", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*An input example was not provided", "The specified dataset source can be interpreted",
                    "Hint: Inferred schema contains integer column"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)

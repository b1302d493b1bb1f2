"""The process environment a vitflow command or flow runs in: offline, quiet, with its homes in the project."""

from __future__ import annotations

import os
from pathlib import Path

from vitflow.paths import work_dir


def set_up() -> None:
    """Turn off telemetry and point Prefect's home into the work directory, unless already set.

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
    }.items():
        os.environ.setdefault(name, value)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level

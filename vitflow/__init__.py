"""vitflow: transfer learning for Vision Transformers, orchestrated by Prefect, tracked by MLflow, versioned by DVC."""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Caches, trained models and Prefect's home; git-ignored. Tests point it elsewhere.
WORK_DIR = Path(os.environ.get("VITFLOW_WORK_DIR", PROJECT_ROOT / ".vitflow"))

# Offline by default: no telemetry, and Prefect's ephemeral server keeps its home inside the project.
for _name, _value in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_HOME": str(WORK_DIR / "prefect"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}.items():
    os.environ.setdefault(_name, _value)
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level

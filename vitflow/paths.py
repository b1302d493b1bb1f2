"""Where the project and its working files are: the one place paths are resolved."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = PROJECT_ROOT / "params.yaml"
MLRUNS_DIR = PROJECT_ROOT / "mlruns"


def work_dir() -> Path:
    """Caches, trained models and Prefect's home: `VITFLOW_WORK_DIR`, else `.vitflow/` in the project (git-ignored)."""
    return Path(os.environ.get("VITFLOW_WORK_DIR") or PROJECT_ROOT / ".vitflow")


def project_path(path: str | Path) -> Path:
    """A path from params.yaml: relative ones are relative to the project, absolute ones stay as they are."""
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path

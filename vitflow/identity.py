"""What counts as changed: one definition of the code a result depends on, and of a training's fingerprint.

The DVC stages in dvc.yaml list the same code (`STAGE_CODE`) as their dependencies; a test keeps them equal.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from vitflow.paths import PROJECT_ROOT

# The library code that decides what preprocessing and training produce.
TRAINING_CODE = ("vitflow/config.py", "vitflow/data", "vitflow/inference.py", "vitflow/models", "vitflow/training")
# What each DVC stage's output depends on: dvc.yaml lists the same paths (besides its data and model).
STAGE_CODE = {
    "foundation": ("vitflow/models/foundation.py",),
    "prepare": ("vitflow/stages.py", *TRAINING_CODE),
    "train": ("vitflow/stages.py", *TRAINING_CODE),
    "evaluate": ("vitflow/stages.py", *TRAINING_CODE, "vitflow/evaluation.py"),
    "export": ("vitflow/stages.py", *TRAINING_CODE, "vitflow/export.py", "vitflow/precision.py"),
}
# All of the project's code: a flow run with the same data, params and code has nothing to do.
PROJECT_CODE = ("vitflow", "tasks", "flows")


def source_files(paths: Iterable[str]) -> list[str]:
    """The Python files at `paths` (files, or folders searched recursively), relative to the project, sorted."""
    files = set()
    for path in paths:
        full = PROJECT_ROOT / path
        found = [full] if full.is_file() else full.rglob("*.py")
        files.update(file.relative_to(PROJECT_ROOT).as_posix() for file in found)
    return sorted(files)


def code_version(paths: Iterable[str] = TRAINING_CODE) -> str:
    """Short hash of the names and contents of the Python files at `paths`."""
    digest = hashlib.sha256()
    for path in source_files(paths):
        digest.update(path.encode())
        digest.update((PROJECT_ROOT / path).read_bytes())
    return digest.hexdigest()[:12]


def fingerprint(*parts: object) -> str:
    """A short, stable hash of JSON-able parts."""
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_fingerprint(data_version: str, params: dict) -> str:
    """What a retraining depends on: data version, every setting and the project's code."""
    return fingerprint(data_version, params, code_version(PROJECT_CODE))


def training_dir(work_dir: Path | str, cache_dir: str, model_source: str, image_size: int | None,
                 strategy_settings: dict) -> Path:
    """Where a training's outputs go: named by data and preprocessing (the cache file), model, settings and code."""
    key = fingerprint(Path(cache_dir).stem, model_source, image_size, strategy_settings, code_version())
    return Path(work_dir) / "models" / key / strategy_settings["strategy"]

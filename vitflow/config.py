"""Load `params.yaml` and apply command-line overrides.

`params.yaml` is the one config source for the Prefect flow, the CLI and DVC stages.
Overrides are dotted keys, e.g. `train.epochs=5` or `train.strategies=[full,partial]`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from vitflow import PROJECT_ROOT
from vitflow.errors import VitflowError

PARAMS_FILE = PROJECT_ROOT / "params.yaml"


def load_params(path: Path | str = PARAMS_FILE, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read the YAML config at `path` and apply `overrides` ("section.key=value" strings)."""
    path = Path(path)
    if not path.is_file():
        raise VitflowError(f"{path}: config file not found; pass --params with the path to params.yaml")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise VitflowError(f"{path}: not valid YAML ({error.__class__.__name__}); fix the file") from None
    for override in overrides or []:
        params = apply_override(params, override)
    return params


def apply_override(params: dict[str, Any], override: str) -> dict[str, Any]:
    """Return a copy of `params` with one "dotted.key=value" override applied; the value is parsed as YAML."""
    key, sep, raw_value = override.partition("=")
    if not sep or not key:
        raise VitflowError(f"override {override!r}: expected KEY=VALUE, e.g. train.epochs=5")
    *parents, leaf = key.split(".")
    updated = copy.deepcopy(params)
    node = updated
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise VitflowError(f"override {override!r}: params.yaml has no section {part!r}")
        node = node[part]
    if leaf not in node:
        raise VitflowError(f"override {override!r}: params.yaml has no setting {key!r}")
    node[leaf] = _parse_value(raw_value)
    return updated


def _parse_value(raw_value: str) -> Any:
    """YAML, except that "5e-4" is a number (PyYAML reads exponents without a dot as strings)."""
    value = yaml.safe_load(raw_value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def get(params: dict[str, Any], key: str) -> Any:
    """Read a dotted key, with a clear error naming the missing setting."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise VitflowError(f"params.yaml: missing setting {key!r}; add it (see the project's params.yaml)")
        node = node[part]
    return node

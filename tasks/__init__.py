"""Prefect tasks, one module per pipeline stage, each a thin `@task` over plain functions."""

import vitflow  # noqa: F401  (sets the offline environment before Prefect is imported)

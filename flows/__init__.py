"""Prefect flows: they only chain the tasks in `tasks/`."""

import vitflow  # noqa: F401  (sets the offline environment before Prefect is imported)

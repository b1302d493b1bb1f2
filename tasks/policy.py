"""How Prefect retries vitflow's tasks, defined once.

Tasks that talk to MLflow retry only when the tracking server could not be reached, on top of MLflow's
own HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR).
"""

from __future__ import annotations

from functools import partial

from prefect import task

from vitflow.tracking import TrackingServerUnreachable

RETRY_DELAYS_SECONDS = [2, 5, 15]


def retry_if_unreachable(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only when the tracking server could not be reached."""
    return isinstance(state.result(raise_on_failure=False), TrackingServerUnreachable)


tracking_task = partial(task, retries=len(RETRY_DELAYS_SECONDS), retry_delay_seconds=RETRY_DELAYS_SECONDS,
                        retry_condition_fn=retry_if_unreachable)

"""How Prefect retries vitflow's tasks, defined once.

Tasks that talk to MLflow retry only when the tracking server could not be reached, on top of MLflow's
own HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR): after 2, 5 and 15 s by
default, or the delays in VITFLOW_TRACKING_RETRY_DELAYS (seconds, comma-separated; empty: no retries).
"""

from __future__ import annotations

import os
from functools import partial

from prefect import task

from vitflow.tracking import TrackingServerUnreachable

RETRY_DELAYS_SECONDS = [float(delay) for delay in os.environ.get("VITFLOW_TRACKING_RETRY_DELAYS", "2,5,15").split(",")
                        if delay.strip()]


def retry_if_unreachable(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only when the tracking server could not be reached."""
    return isinstance(state.result(raise_on_failure=False), TrackingServerUnreachable)


tracking_task = partial(task, retries=len(RETRY_DELAYS_SECONDS), retry_delay_seconds=RETRY_DELAYS_SECONDS,
                        retry_condition_fn=retry_if_unreachable)

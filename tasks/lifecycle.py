"""Keep the run records true when a flow run ends: Prefect state hooks, and Prefect's side of closing abandoned runs.

A flow run that fails, crashes or is cancelled ends the MLflow runs it left RUNNING as FAILED or KILLED,
with the reason as a tag; any flow run gives back its run lock when it ends. A `kill -9` runs no hook:
the next start closes what it left (`vitflow.tracking.close_abandoned_runs`) and marks its Prefect flow
run Crashed here.
"""

import logging
import os

from prefect.client.orchestration import get_client
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Crashed

from vitflow import locks
from vitflow.tracking import ClosedRun, end_runs_of

log = logging.getLogger(__name__)


def owner() -> str:
    """Who holds the run lock and owns the MLflow runs: the Prefect flow run, or this process outside one."""
    return str(current_flow_run.id or f"process-{os.getpid()}")


def end_run_records(flow, flow_run, state) -> None:
    """`on_failure` / `on_crashed` / `on_cancellation`: end what the flow run left RUNNING, then give back its lock."""
    status = "KILLED" if state.is_cancelled() or state.is_crashed() else "FAILED"
    reason = (state.message or state.name or status).splitlines()[0]
    try:
        ended = end_runs_of(str(flow_run.id), status, reason)
        if ended:
            log.info("marked %d MLflow run(s) %s: %s", len(ended), status, reason)
    except Exception as error:  # the tracking server may be what failed: say so, the next start closes them
        log.warning("could not end the MLflow runs of flow run %s (%s); the next run closes them", flow_run.id, error)
    finally:
        locks.release_all(str(flow_run.id))


def release_run_lock(flow, flow_run, state) -> None:
    """`on_completion`: give back the run lock."""
    locks.release_all(str(flow_run.id))


def mark_crashed(closed: list[ClosedRun]) -> None:
    """Set the Prefect flow runs behind closed MLflow runs to Crashed, where Prefect still has them running."""
    flow_run_ids = {run.flow_run_id: run.reason for run in closed if run.flow_run_id
                    and not run.flow_run_id.startswith("process-")}
    if not flow_run_ids:
        return
    with get_client(sync_client=True) as client:
        for flow_run_id, reason in flow_run_ids.items():
            try:
                found = client.read_flow_run(flow_run_id)
            except Exception:  # recorded by another Prefect server, or deleted since
                continue
            if found.state is not None and found.state.is_running():
                client.set_flow_run_state(flow_run_id, Crashed(message=reason), force=True)

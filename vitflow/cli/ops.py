"""The operations commands of the `vitflow` command line.

    vitflow serve --cron "0 3 * * 1" [--timezone Europe/Paris] [--name NAME] [--set KEY=VALUE ...] [--force]

`serve` needs a Prefect server (`prefect server start`, then `PREFECT_API_URL=http://127.0.0.1:4200/api`):
it registers the `retrain` flow as the deployment `retrain/NAME` with that schedule and runs it here when due
or when triggered (`prefect deployment run retrain/NAME`). Stopping it (Ctrl-C, SIGTERM) pauses the schedule;
serving again resumes it. To run on a work pool with a worker instead, see the project's prefect.yaml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vitflow.errors import VitflowError
from vitflow.paths import PARAMS_FILE

DEFAULT_DEPLOYMENT = "scheduled"


def add_commands(commands) -> None:
    """Add `serve` to the `add_subparsers()` object `commands`."""
    serve = commands.add_parser("serve", help="serve the retrain flow on a cron schedule (needs a Prefect server)")
    serve.add_argument("--cron", required=True, help='when to retrain, e.g. "0 3 * * 1" (Mondays at 03:00)')
    serve.add_argument("--timezone", help="IANA timezone of the cron, e.g. Europe/Paris (default: UTC)")
    serve.add_argument("--name", default=DEFAULT_DEPLOYMENT,
                       help=f"deployment name: runs are retrain/NAME (default: {DEFAULT_DEPLOYMENT})")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="params.yaml override passed to every run, e.g. --set train.epochs=5 (repeatable)")
    serve.add_argument("--force", action="store_true", help="retrain every time, even when nothing changed")
    serve.add_argument("--params", default=str(PARAMS_FILE), help="config file (default: the project's params.yaml)")
    serve.set_defaults(handler=serve_command)


def cron_schedule(cron: str, timezone: str | None):
    """A Prefect cron schedule; a bad cron string or timezone is a VitflowError."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as error:
        reason = error.errors()[0]["msg"].removeprefix("Value error, ")
        raise VitflowError(f"schedule {cron!r}{f' in {timezone}' if timezone else ''}: {reason}") from None
    return Cron(cron, timezone=timezone)


def prefect_api_url() -> str:
    """The Prefect server to serve on; it must be set and answer, since an ephemeral server cannot schedule."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise VitflowError("serve needs a Prefect server: run `prefect server start`, then set "
                           "PREFECT_API_URL=http://127.0.0.1:4200/api")
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise VitflowError(f"Prefect server at {url} is unreachable ({type(failure).__name__}); "
                           "start it with `prefect server start` or fix PREFECT_API_URL")
    return url


def serve_command(args: argparse.Namespace) -> int:
    from prefect.types.entrypoint import EntrypointType

    from vitflow.preflight import plan_run

    schedule = cron_schedule(args.cron, args.timezone)
    params_file = str(Path(args.params).resolve())
    plan_run(params_file, args.set)  # a bad setting fails now, not at the first scheduled run
    url = prefect_api_url()
    from flows.retrain import retrain  # slow: torch, transformers, MLflow

    parameters = {"overrides": args.set, "params_file": params_file, "force": args.force}
    print(f"serving retrain/{args.name} on {url}: cron {args.cron!r} ({args.timezone or 'UTC'}), "
          f"overrides {args.set or 'none'}{', forced' if args.force else ''}")
    # paused=False: serving again resumes a schedule that stopping paused (pause_on_shutdown).
    # limit=1: a run that is due while another one trains waits for it.
    retrain.serve(name=args.name, schedules=[schedule], parameters=parameters, paused=False,
                  pause_on_shutdown=True, limit=1, entrypoint_type=EntrypointType.MODULE_PATH)
    return 0

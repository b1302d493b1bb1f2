"""`vitflow ui`: MLflow's UI on the project's tracking store and Prefect's on the project's Prefect home.

    vitflow ui [--host 127.0.0.1] [--mlflow-port 5000] [--prefect-port 4200]

Both servers run until Ctrl-C, which stops both; their output goes to `.vitflow/ui/*.log`. Where
`MLFLOW_TRACKING_URI` or `PREFECT_API_URL` already points at a server, that one is shown instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vitflow.errors import VitflowError
from vitflow.paths import PARAMS_FILE, work_dir

MLFLOW_PORT = 5000
PREFECT_PORT = 4200
START_SECONDS = 180  # Prefect's server migrates its database on first start; a busy machine is slow


def add_commands(commands) -> None:
    ui = commands.add_parser("ui", help="serve MLflow's and Prefect's UIs on this project's runs until Ctrl-C")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    ui.add_argument("--mlflow-port", type=int, default=MLFLOW_PORT, help=f"default: {MLFLOW_PORT}")
    ui.add_argument("--prefect-port", type=int, default=PREFECT_PORT, help=f"default: {PREFECT_PORT}")
    ui.add_argument("--params", default=str(PARAMS_FILE), help=argparse.SUPPRESS)
    ui.set_defaults(handler=ui_command)


class Server:
    """A server process in its own process group (so that stopping it stops what it started), logging to a file."""

    def __init__(self, name: str, command: list[str], health_url: str, log: Path, env: dict[str, str] | None = None):
        self.name, self.health_url, self.log = name, health_url, log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, **(env or {})})

    def wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise VitflowError(f"{self.name} server stopped ({self.process.returncode}); see {self.log}")
            try:
                urllib.request.urlopen(self.health_url, timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise VitflowError(f"{self.name} server did not answer within {START_SECONDS} s; see {self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def prefect_server(host: str, port: int, log: Path, *options: str) -> Server:
    """`prefect server start` on the Prefect home set up for vitflow; its UI is told where its API is (by default
    Prefect's UI calls port 4200 whatever port it serves on)."""
    return Server("Prefect", [sys.executable, "-m", "prefect", "server", "start", *options],
                  f"http://{host}:{port}/api/health", log,
                  {"PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)})


def ui_command(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    from vitflow.config import load_config
    from vitflow.tracking import configure_mlflow, experiment_page, server_url, tracking_uri

    logs = work_dir() / "ui"
    servers = []
    mlflow_url, prefect_url = server_url(), (PREFECT_API_URL.value() or "").removesuffix("/api")
    try:
        if not mlflow_url:
            mlflow_url = f"http://{args.host}:{args.mlflow_port}"
            servers.append(Server("MLflow", [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                             tracking_uri(), "--host", args.host, "--port", str(args.mlflow_port)],
                                  f"{mlflow_url}/health", logs / "mlflow.log"))
        if not prefect_url:
            prefect_url = f"http://{args.host}:{args.prefect_port}"
            servers.append(prefect_server(args.host, args.prefect_port, logs / "prefect.log"))
        deadline = time.monotonic() + START_SECONDS
        for server in servers:
            server.wait_healthy(deadline)
        experiment = configure_mlflow().get_experiment_by_name(load_config(args.params).mlflow.experiment)
        print(f"MLflow:  {experiment_page(mlflow_url, experiment.experiment_id) if experiment else mlflow_url}"
              f"  (runs in {tracking_uri()})")
        print(f"Prefect: {prefect_url}/runs  (Prefect home {PREFECT_HOME.value()})")
        if not servers:
            return 0
        print(f"a run started with PREFECT_API_URL={prefect_url}/api shows in Prefect as it runs; "
              f"Ctrl-C stops the servers (logs in {logs})", flush=True)
        while all(server.process.poll() is None for server in servers):
            time.sleep(1)
        stopped = next(server for server in servers if server.process.poll() is not None)
        raise VitflowError(f"{stopped.name} server stopped ({stopped.process.returncode}); see {stopped.log}")
    except KeyboardInterrupt:
        return 0
    finally:
        for server in servers:
            server.stop()

"""Open MLflow's compare view of the latest flow run's strategies in headless Chromium and screenshot it.

    uv run python scripts/check_mlflow_ui.py [--out docs/mlflow-compare.png]

Starts `mlflow server` on loopback over the project's store, waits for it, points Chromium
(Debian's `chromium` package) at the compare-runs page for the newest parent run's nested runs,
writes the PNG, and stops the server.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

from vitflow.config import load_config
from vitflow.tracking import tracking_uri

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1600,1100", "--virtual-time-budget=20000"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def latest_strategy_runs(client: MlflowClient, experiment: str) -> tuple[str, list[str]]:
    """(experiment id, run ids of the newest parent run's nested runs)."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    parents = client.search_runs([experiment_id], "tags.run_fingerprint != '' and attributes.status = 'FINISHED'",
                                 order_by=["attributes.start_time DESC"], max_results=20)
    for parent in parents:
        children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        if children:
            return experiment_id, [run.info.run_id for run in children]
    sys.exit(f"error: no finished flow run with strategy runs in experiment {experiment!r}; run `vitflow run` first")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", default="docs/mlflow-compare.png")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("error: chromium not found; install Debian's package: apt-get install chromium")
    uri = tracking_uri()
    experiment_id, run_ids = latest_strategy_runs(MlflowClient(uri), load_config().mlflow.experiment)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", uri], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit("error: mlflow server did not start within 90 s")
                time.sleep(1)
        query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
        page = f"http://127.0.0.1:{port}/#/compare-runs?{query}"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                            f"--screenshot={Path(args.out).resolve()}", page],
                           check=True, timeout=120, capture_output=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"compare view of {len(run_ids)} runs: {page}\nscreenshot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

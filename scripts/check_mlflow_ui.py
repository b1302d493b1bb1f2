"""Screenshot what the latest flow run left in MLflow's and Prefect's UIs, in headless Chromium.

    uv run --with playwright python scripts/check_mlflow_ui.py [--out docs] [--experiment NAME] [--name MODEL]

Starts an MLflow server on the project's store and a Prefect server on its Prefect home (as `vitflow ui` does, on
free ports), finds the newest finished flow run with strategy runs, and writes, as PNG: in MLflow, the runs list
as the printed link opens it (`mlflow-runs.png`) and as charts (`mlflow-charts.png`); in a tall window, the
champion's run (`mlflow-run.png`), its loss charts (`mlflow-run-metrics.png`) and the compare view of the
strategies (`mlflow-compare.png`); the registered model (`mlflow-model.png`) and the champion's model card
(`mlflow-model-version.png`); in Prefect, the flow run with the task runs of the champion's branch
(`prefect-flow-run.png`) and its comparison artifact (`prefect-comparison.png`). Playwright drives Debian's
`chromium` package (`apt-get install chromium`); its own browser download is not needed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

from vitflow import environment
from vitflow.cli.ui import Server, prefect_server
from vitflow.config import load_config
from vitflow.paths import work_dir
from vitflow.tracking import experiment_page, tracking_uri

VIEWPORT = {"width": 1600, "height": 1000}
TALL = {"width": 1600, "height": 2200}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def latest_flow_run(client: MlflowClient, experiment: str):
    """(experiment id, the newest finished parent run that has strategy runs, their run ids)."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    parents = client.search_runs([experiment_id], "tags.run_fingerprint != '' and attributes.status = 'FINISHED'",
                                 order_by=["attributes.start_time DESC"], max_results=20)
    for parent in parents:
        children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        if children:
            return experiment_id, parent, [run.info.run_id for run in children]
    sys.exit(f"error: no finished flow run with strategy runs in experiment {experiment!r}; run `vitflow run` first")


def shoot(page, url: str, path: Path, ready: str) -> None:
    """Open `url` and `snap` it."""
    page.goto(url)
    snap(page, path, ready)


def snap(page, path: Path, ready: str) -> None:
    """Wait for the text `ready`, let the charts settle, and save a screenshot at `path`."""
    page.get_by_text(ready, exact=False).first.wait_for(timeout=60_000)
    page.wait_for_timeout(3000)
    page.screenshot(path=str(path))
    print(f"{path}: {page.url}")


def latest_artifact_id(prefect_url: str, key: str) -> str:
    """The id of the newest Prefect artifact with `key`."""
    query = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}
    request = urllib.request.Request(f"{prefect_url}/api/artifacts/filter", data=json.dumps(query).encode(),
                                     headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(request))[0]["id"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", default="docs", help="folder for the PNGs (default: docs)")
    parser.add_argument("--experiment", help="MLflow experiment (default: params.yaml's mlflow.experiment)")
    parser.add_argument("--name", help="registered model (default: params.yaml's registry.model_name)")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("error: chromium not found; install Debian's package: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    environment.set_up()
    config = load_config()
    client = MlflowClient(tracking_uri(), tracking_uri())
    experiment_id, parent, run_ids = latest_flow_run(client, args.experiment or config.mlflow.experiment)
    model_name = args.name or config.registry.model_name
    champion = client.get_model_version_by_alias(model_name, "champion").version
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    mlflow_port, prefect_port = free_port(), free_port()
    mlflow_url, prefect_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}"
    logs = work_dir() / "ui"
    servers = [Server("MLflow", [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri(),
                                 "--host", "127.0.0.1", "--port", str(mlflow_port)],
                      f"{mlflow_url}/health", logs / "screenshots-mlflow.log"),
               prefect_server("127.0.0.1", prefect_port, logs / "screenshots-prefect.log", "--no-services")]
    try:
        deadline = time.monotonic() + 180
        for server in servers:
            server.wait_healthy(deadline)
        runs = experiment_page(mlflow_url, experiment_id)
        genai_off = "workflowType=machine_learning"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport=VIEWPORT)
            # As if closed once: MLflow 3 opens its assistant panel beside every page, over a third of the runs table.
            page.add_init_script("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                                 "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")
            shoot(page, runs, out / "mlflow-runs.png", parent.info.run_name)
            shoot(page, f"{runs}&compareRunsMode=CHART", out / "mlflow-charts.png", "Model metrics")
            page.set_viewport_size(TALL)  # these pages scroll inside a panel: a taller window shows more
            champion_run = client.get_model_version(model_name, champion).run_id
            shoot(page, f"{mlflow_url}/#/experiments/{experiment_id}/runs/{champion_run}?{genai_off}",
                  out / "mlflow-run.png", "About this run")
            page.get_by_role("tab", name="Model metrics").click()
            page.get_by_placeholder("Search metric charts").fill("loss")  # per step and per epoch, logged live
            snap(page, out / "mlflow-run-metrics.png", "train_loss")
            compare = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id]),
                                              "workflowType": "machine_learning"})
            shoot(page, f"{mlflow_url}/#/compare-runs?{compare}", out / "mlflow-compare.png", "Metrics")
            page.set_viewport_size(VIEWPORT)
            shoot(page, f"{mlflow_url}/#/models/{model_name}?{genai_off}", out / "mlflow-model.png",
                  "Champion history")
            shoot(page, f"{mlflow_url}/#/models/{model_name}/versions/{champion}?{genai_off}",
                  out / "mlflow-model-version.png", "Load it")
            tags = client.get_run(champion_run).data.tags
            branch = f"{tags.get('model', '')}-{tags['strategy']}"  # as the flow names the branch's task runs
            page.set_viewport_size(TALL)
            page.goto(f"{prefect_url}/runs/flow-run/{flow_run_id}")
            page.get_by_text("Task Runs", exact=True).first.click()
            page.get_by_placeholder("Search by run name").fill(branch)  # one branch's task runs
            snap(page, out / "prefect-flow-run.png", f"fine-tune-{branch}")
            page.set_viewport_size(VIEWPORT)
            artifact = latest_artifact_id(prefect_url, "strategy-comparison")
            shoot(page, f"{prefect_url}/artifacts/artifact/{artifact}", out / "prefect-comparison.png", "accuracy")
            browser.close()
    finally:
        for server in servers:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

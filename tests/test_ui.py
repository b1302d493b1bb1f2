"""`vitflow ui`: MLflow's and Prefect's servers on the project's stores, their addresses printed, both stopped by
Ctrl-C. Real servers on free ports, stores under tmp_path."""

import json
import os
import signal
import sys
import urllib.request

import pytest
from servers import free_port, start, stop, tail, wait_for_line

pytestmark = pytest.mark.slow


def test_vitflow_ui_serves_mlflow_and_prefect_until_ctrl_c(tmp_path):
    mlflow_port, prefect_port = free_port(), free_port()
    env = {**os.environ, "VITFLOW_WORK_DIR": str(tmp_path / "work"), "PREFECT_HOME": str(tmp_path / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "ui.log"
    command = [sys.executable, "-c", "import sys; from vitflow.cli import main; sys.exit(main())", "ui",
               "--mlflow-port", str(mlflow_port), "--prefect-port", str(prefect_port)]
    process = start(command, env, log)
    try:
        wait_for_line(log, "Ctrl-C stops the servers", process, timeout=240)
        printed = log.read_text()
        assert f"MLflow:  http://127.0.0.1:{mlflow_port}" in printed and str(tmp_path / "mlflow.db") in printed
        assert f"Prefect: http://127.0.0.1:{prefect_port}/runs" in printed and str(tmp_path / "prefect") in printed
        urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=5)
        ui_settings = json.load(urllib.request.urlopen(f"http://127.0.0.1:{prefect_port}/ui-settings", timeout=5))
        assert ui_settings["api_url"] == f"http://127.0.0.1:{prefect_port}/api"  # not Prefect's default 4200
        assert (tmp_path / "prefect" / "prefect.db").is_file()  # the project's Prefect home, not ~/.prefect

        os.kill(process.pid, signal.SIGINT)  # what Ctrl-C sends it
        assert process.wait(60) == 0, tail(log)
        for url in (f"http://127.0.0.1:{mlflow_port}/health", f"http://127.0.0.1:{prefect_port}/api/health"):
            with pytest.raises(OSError):
                urllib.request.urlopen(url, timeout=5)
    finally:
        stop(process)

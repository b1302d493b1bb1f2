"""Start real servers (Prefect, MLflow, `vitflow serve`) as subprocesses for tests, and always stop them.

    with running([...command...], env, log_path, health_url="http://127.0.0.1:PORT/health") as process:
        ...

Each process gets its own process group so that stopping it also stops the workers it spawned;
stopping is bounded: SIGTERM, a wait, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start `command` in its own process group, output to `log_path`."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 90) -> None:
    """Poll `url` until it answers 200; fail with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with {process.returncode}:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s:\n{tail(log_path)}")


def wait_for_line(log_path: Path, text: str, process: subprocess.Popen, timeout: float = 90) -> None:
    """Wait until `text` appears in the process's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log_path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with {process.returncode}:\n{tail(log_path)}")
        time.sleep(0.5)
    raise TimeoutError(f"{text!r} not in the log after {timeout:.0f} s:\n{tail(log_path)}")


def stop(process: subprocess.Popen, timeout: float = 20) -> int:
    """SIGTERM the process group, wait up to `timeout` s, then SIGKILL it; return the exit code."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    with suppress(ProcessLookupError):  # workers the server spawned may outlive it
        os.killpg(process.pid, signal.SIGKILL)
    return process.returncode


@contextmanager
def running(command: list[str], env: dict[str, str], log_path: Path, health_url: str | None = None,
            ready_line: str | None = None, timeout: float = 90, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """Start `command`, wait until it is ready (health URL or log line), and stop it on the way out."""
    process = start(command, env, log_path, cwd)
    try:
        if health_url:
            wait_healthy(health_url, process, log_path, timeout)
        if ready_line:
            wait_for_line(log_path, ready_line, process, timeout)
        yield process
    finally:
        stop(process)


def tail(log_path: Path, lines: int = 40) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def mlflow_server_command(port: int, root: Path) -> list[str]:
    """`mlflow server` on 127.0.0.1:`port`, its SQLite store and artifacts under `root`."""
    return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts")]

"""One run at a time per key: an exclusive lock on a file that names its holder.

The lock is the operating system's (`flock`), so it goes when its process does, even after `kill -9`;
the file keeps who held it last (pid, host, owner, since) for the message a waiting run prints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from vitflow.errors import VitflowError

_held: dict[str, dict[Path, IO]] = {}  # owner -> its open lock files (a lock lasts as long as its file is open)


def acquire(path: Path, owner: str, wait_seconds: float, what: str, poll_seconds: float = 1.0) -> bool:
    """Hold the lock at `path` for `owner`; returns whether it had to wait for another holder.

    Waits up to `wait_seconds` while another process holds it, then raises a VitflowError naming the holder.
    """
    if path in _held.get(owner, {}):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    deadline, waited = time.monotonic() + wait_seconds, False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.close()
                raise VitflowError(f"{what} is running already ({describe_holder(path)}); waited {wait_seconds:.0f} s. "
                                   f"Let it finish, or raise mlflow.lock_wait_minutes") from None
            waited = True
            time.sleep(poll_seconds)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "owner": owner,
                             "since": datetime.now(UTC).isoformat(timespec="seconds")}))
    handle.flush()
    _held.setdefault(owner, {})[path] = handle
    return waited


def release_all(owner: str) -> None:
    """Release every lock `owner` holds in this process."""
    for handle in _held.pop(owner, {}).values():
        handle.close()


def describe_holder(path: Path) -> str:
    """"pid P on HOST since T, owner O" from the lock file, or what is known."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"holder unknown, lock {path}"
    return f"pid {holder['pid']} on {holder['host']} since {holder['since']}, flow run {holder['owner']}, lock {path}"


def process_alive(pid: int, host: str) -> bool | None:
    """Whether process `pid` on `host` runs; None when `host` is another machine (it cannot be told from here)."""
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

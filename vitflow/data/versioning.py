"""Which data and code a run saw: the data's DVC version and the code's git commit.

Inside a DVC repo the data folder is `dvc add`-ed when it changed (never modified otherwise); outside
one it gets a content hash and nothing is written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from vitflow.errors import VitflowError
from vitflow.paths import PROJECT_ROOT


@dataclass(frozen=True)
class DataVersion:
    """Which data a run saw.

    hash: DVC's directory md5 ("<md5>.dir") when tracked, else "content-<md5>" of (path, file md5) pairs.
    tracked: tracked by DVC in this repo. dirty: this version is not committed in git (the .dvc file
    is new or changed, or files under the data path are uncommitted; always true when untracked).
    path: relative to the repo when tracked, else absolute.
    """

    hash: str
    tracked: bool
    dirty: bool
    path: str

    @property
    def short(self) -> str:
        return short_hash(self.hash)


def short_hash(data_version: str | None) -> str:
    """The 8-character form of a data version ("content-<md5>" or "<md5>.dir"), "" when missing."""
    return (data_version or "").removeprefix("content-")[:8]


def run_dvc(repo_root: Path, *args: str) -> str:
    """Run `dvc <args>` in `repo_root`; returns stdout, raises VitflowError with dvc's error line."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo_root, capture_output=True, text=True,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or [f"exit code {result.returncode}"]
        raise VitflowError(f"`dvc {' '.join(args)}` in {repo_root} failed: {errors[-1]}")
    return result.stdout


def git_state(repo_root: Path = PROJECT_ROOT) -> dict[str, str]:
    """The commit the code runs from and whether the working tree has uncommitted changes."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def _git_dirty(repo_root: Path, paths: Iterable[str]) -> bool:
    """True unless every path is committed and unchanged in git (a new or staged file counts as dirty)."""
    try:
        result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *paths],
                                cwd=repo_root, capture_output=True, text=True)
    except FileNotFoundError:  # no git at all
        return True
    return result.returncode != 0 or bool(result.stdout.strip())


def _inside(path: Path, root: Path) -> bool:
    return path != root and path.is_relative_to(root)


def files_under(folder: Path) -> list[Path]:
    """Every file under `folder`, sorted by relative posix path (never the file system's order)."""
    return sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())


def _md5(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def content_hash(data_path: Path | str) -> str:
    """"content-<md5>" over the sorted (relative posix path, file md5) pairs of every file under `data_path`
    (or of the one file it names)."""
    data_path = Path(data_path)
    files = [data_path] if data_path.is_file() else files_under(data_path)
    root = data_path.parent if data_path.is_file() else data_path
    digest = hashlib.md5()
    for path in files:
        digest.update(f"{path.relative_to(root).as_posix()}\0{_md5(path)}\n".encode())
    return f"content-{digest.hexdigest()}"


def restore_data(data_path: Path | str, repo_root: Path | str = PROJECT_ROOT) -> bool:
    """Fill a missing or file-less `data_path` from DVC when `<data_path>.dvc` exists in the repo.

    Tries `dvc checkout` (local cache) first, then `dvc pull` (remote). Returns whether it restored.
    """
    data_path, repo_root = Path(data_path).resolve(), Path(repo_root).resolve()
    dvc_file = data_path.with_name(f"{data_path.name}.dvc")
    present = data_path.is_file() or data_path.is_dir() and any(path.is_file() for path in data_path.rglob("*"))
    if present or not dvc_file.is_file() or not _inside(data_path, repo_root):
        return False
    target = dvc_file.relative_to(repo_root).as_posix()
    try:
        run_dvc(repo_root, "checkout", target)
    except VitflowError:
        try:
            run_dvc(repo_root, "pull", target)
        except VitflowError as error:
            raise VitflowError(f"{data_path}: missing and not restorable from DVC ({error}); check the DVC remote "
                               "(`dvc remote list`) or put the data there yourself") from None
    return True


def version_data(data_path: Path | str, repo_root: Path | str = PROJECT_ROOT) -> DataVersion:
    """The DataVersion of `data_path` (a folder or a file).

    Inside a DVC repo: `dvc add` it when untracked or changed (skipped when unchanged), hash from the .dvc file.
    Elsewhere: a content hash; nothing is written anywhere. The user's files are never modified.
    """
    data_path, repo_root = Path(data_path).resolve(), Path(repo_root).resolve()
    if not data_path.exists():
        raise VitflowError(f"{data_path}: data not found; set data.path or pass --data")
    if not (_inside(data_path, repo_root) and (repo_root / ".dvc").is_dir()):
        return DataVersion(hash=content_hash(data_path), tracked=False, dirty=True, path=str(data_path))
    rel = data_path.relative_to(repo_root).as_posix()
    dvc_file = repo_root / f"{rel}.dvc"
    if not dvc_file.is_file() or json.loads(run_dvc(repo_root, "status", "--json", f"{rel}.dvc") or "{}"):
        run_dvc(repo_root, "add", rel)
    outs = yaml.safe_load(dvc_file.read_text())["outs"]
    return DataVersion(hash=outs[0]["md5"], tracked=True, dirty=_git_dirty(repo_root, [f"{rel}.dvc", rel]), path=rel)

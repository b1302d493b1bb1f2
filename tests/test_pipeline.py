"""The DVC pipeline (dvc.yaml + vitflow/stages.py) run for real in a scratch git+DVC repo, and the offline remote.

The scratch repo holds a copy of vitflow/, the project's dvc.yaml without the `foundation` stage
(the tiny model stands in for the foundation backbone) and a params.yaml for tiny runs with one strategy: every
stage is a process that spends ~15 s CPU importing torch, transformers and Prefect. The project's own dvc.yaml is
checked to expand to a train/evaluate/export stage per strategy without running anything.
"""

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from configobj import ConfigObj

from vitflow.identity import STAGE_CODE

PROJECT = Path(__file__).resolve().parents[1]
STAGES = {"prepare", "train@full", "evaluate@full", "export@full"}


def run(repo: Path, *command: str) -> str:
    """Run `command` in `repo` with this venv's python first on PATH and `repo` on PYTHONPATH; returns stdout."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def dvc(repo: Path, *args: str) -> str:
    return run(repo, sys.executable, "-m", "dvc", *args)


def git_dvc_repo(repo: Path) -> Path:
    """`repo` as a fresh git repository with DVC initialised and a committer identity."""
    repo.mkdir(parents=True, exist_ok=True)
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.name", "vitflow tests")
    run(repo, "git", "config", "user.email", "tests@vitflow.invalid")
    dvc(repo, "init", "-q")
    return repo


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.fixture
def pipeline_repo(tmp_path, tiny_hf_model, pneumonia_folder) -> Path:
    """A committed scratch repo: code, tiny model, DVC-tracked images, the pipeline and tiny params."""
    repo = git_dvc_repo(tmp_path / "repo")
    shutil.copytree(PROJECT / "vitflow", repo / "vitflow", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_hf_model, repo / "models" / "tiny")
    shutil.copytree(pneumonia_folder, repo / "data")
    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    del pipeline["stages"]["foundation"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["model"]["source"] = "models/tiny"
    params["train"].update(strategies=["full"], epochs=1)
    params["export"]["precisions"] = ["fp16"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, "add", "-q", "data")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "scratch pipeline")
    return repo


def test_project_pipeline_has_a_train_evaluate_export_stage_per_strategy():
    names = dvc(PROJECT, "stage", "list", "--name-only").split()
    strategies = yaml.safe_load((PROJECT / "params.yaml").read_text())["train"]["strategies"]
    assert names == ["foundation", "prepare", *(f"{stage}@{strategy}" for stage in ("train", "evaluate", "export")
                                                for strategy in strategies)]


def test_each_stage_depends_on_the_code_vitflow_fingerprints_it_by():
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_CODE)
    for name, code in STAGE_CODE.items():
        deps = stages[name].get("do", stages[name])["deps"]
        assert [dep for dep in deps if dep.startswith("vitflow/")] == list(code), name


@pytest.mark.slow
def test_dvc_pipeline_reproduces_and_reruns_only_what_a_param_touches(pipeline_repo):
    repo = pipeline_repo
    assert set(stages_run(dvc(repo, "repro"))) == STAGES
    assert json.loads(dvc(repo, "status", "--json")) == {}
    metrics = json.loads(dvc(repo, "metrics", "show", "--json"))[""]["data"]
    assert 0 <= metrics["pipeline/metrics/eval-full.json"]["data"]["test_accuracy"] <= 1
    assert metrics["pipeline/metrics/train-full.json"]["data"]["trainable_params"] > 0
    assert metrics["pipeline/metrics/export-full.json"]["data"]["fp16"]["top1_agreement"] > 0.9
    plots = json.loads(dvc(repo, "plots", "show", "--json"))["data"]
    assert set(plots) == {"pipeline/plots/train/full.csv", "pipeline/plots/predictions-full.csv"}

    again = dvc(repo, "repro")
    assert not stages_run(again) and "Data and pipelines are up to date" in again

    experiment = dvc(repo, "exp", "run", "--set-param", "train.epochs=2", "train@full")
    assert stages_run(experiment) == ["train@full"]
    assert "Stage 'prepare' didn't change" in experiment
    assert set(json.loads(dvc(repo, "status", "--json"))) == {"evaluate@full", "export@full"}
    rows = list(csv.DictReader(io.StringIO(dvc(repo, "exp", "show", "--csv"))))  # workspace, HEAD, experiment
    experiment_row = next(row for row in rows if row["Experiment"])
    assert experiment_row["train.epochs"] == "2"
    val_accuracy = [value for column, value in experiment_row.items() if column.endswith("val_accuracy")]
    assert len(val_accuracy) == 1 and 0 <= float(val_accuracy[0]) <= 1  # headers lose their file when unique


def test_local_remote_round_trip_restores_data_and_model_byte_for_byte(tmp_path, pneumonia_folder, tiny_hf_model):
    repo = git_dvc_repo(tmp_path / "repo")
    dvc(repo, "remote", "add", "--default", "scratch", "../remote")
    shutil.copytree(pneumonia_folder / "test", repo / "data")
    shutil.copytree(tiny_hf_model, repo / "model")
    dvc(repo, "add", "-q", "data", "model")
    originals = {name: file_bytes(repo / name) for name in ("data", "model")}
    dvc(repo, "push", "-q")

    for folder in ("data", "model", ".dvc/cache"):
        shutil.rmtree(repo / folder)
    dvc(repo, "pull", "-q")
    assert {name: file_bytes(repo / name) for name in ("data", "model")} == originals
    assert json.loads(dvc(repo, "status", "--cloud", "--json")) == {}
    assert json.loads(dvc(repo, "status", "--json")) == {}


def test_project_default_remote_is_a_relative_folder_committed_with_the_data():
    config = ConfigObj(str(PROJECT / ".dvc" / "config"))
    url = config[f'remote "{config["core"]["remote"]}"']["url"]
    assert "://" not in url and not Path(url).is_absolute()
    remote = (PROJECT / ".dvc" / url).resolve()
    digest = yaml.safe_load((PROJECT / "data.dvc").read_text())["outs"][0]["md5"]
    listing = remote / "files" / "md5" / digest[:2] / digest[2:]
    objects = [listing] + [remote / "files" / "md5" / entry["md5"][:2] / entry["md5"][2:]
                           for entry in json.loads(listing.read_text())]
    committed = set(run(PROJECT, "git", "ls-files", "-z", "--", remote.name).split("\0"))
    assert {path.relative_to(PROJECT).as_posix() for path in objects} <= committed

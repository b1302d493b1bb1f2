"""Records that stay true: run locks, runs ended after failures and kills, caches that cannot poison, safe loading."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import preprocess_folder
from mlflow.tracking import MlflowClient

from vitflow import locks
from vitflow.config import ModelConfig, TrainConfig
from vitflow.data.cache import is_readable_cache, load_split, preprocess_dataset
from vitflow.errors import VitflowError
from vitflow.models import load_model
from vitflow.tracking import close_abandoned_runs, end_runs_of, tracking_uri
from vitflow.training.loop import RESULT_FILE, train_or_reuse
from vitflow.training.strategies import resolve

LABELS = ["normal", "pneumonia"]


# --------------------------------------------------------------------------- run locks


def test_a_second_holder_waits_then_gets_the_lock_or_is_told_who_holds_it(tmp_path):
    path = tmp_path / "locks" / "fingerprint.lock"
    assert locks.acquire(path, "first", wait_seconds=0, what="the same run") is False
    assert locks.acquire(path, "first", wait_seconds=0, what="the same run") is False  # a retry of the holder
    holder = json.loads(path.read_text())
    assert holder["pid"] == os.getpid() and holder["owner"] == "first"

    with pytest.raises(VitflowError, match=r"the same run is running already \(pid \d+ on .* flow run first"):
        _acquire_elsewhere(path, wait_seconds=0)

    threading.Timer(1.0, locks.release_all, ["first"]).start()
    start = time.monotonic()
    assert _acquire_elsewhere(path, wait_seconds=30) == "waited"
    assert time.monotonic() - start >= 0.9


def test_a_lock_goes_with_a_killed_holder(tmp_path):
    path = tmp_path / "fingerprint.lock"
    script = (f"import time; from vitflow import locks; from pathlib import Path; "
              f"locks.acquire(Path({str(path)!r}), 'doomed', 0, 'x'); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(VitflowError, match="flow run doomed"):
            _acquire_elsewhere(path, wait_seconds=0)
    finally:
        holder.kill()
        holder.wait()
    assert _acquire_elsewhere(path, wait_seconds=5) == "acquired"


def _acquire_elsewhere(path, wait_seconds) -> str:
    """Take the lock in another process (flock locks belong to open files, so a thread here would share it)."""
    script = (f"from vitflow import locks; from pathlib import Path; import sys\n"
              f"try:\n    waited = locks.acquire(Path({str(path)!r}), 'second', {wait_seconds}, 'the same run', 0.2)\n"
              f"except Exception as error:\n    print(error); sys.exit(3)\n"
              f"print('waited' if waited else 'acquired')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    if done.returncode == 3:
        raise VitflowError(done.stdout.strip())
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# --------------------------------------------------------------------------- runs ended after failures and kills


def _run(client, experiment_id, tags, parent=None):
    extra = {"mlflow.parentRunId": parent} if parent else {}
    return client.create_run(experiment_id, tags={**tags, **extra}).info.run_id


def test_runs_left_running_by_a_gone_process_are_closed_as_killed(tmp_path):
    client = MlflowClient(tracking_uri(), tracking_uri())
    experiment_id = client.create_experiment(f"abandoned-{tmp_path.name}",
                                             artifact_location=(tmp_path / "artifacts").as_uri())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = os.uname().nodename
    dead = {"vitflow.pid": gone, "vitflow.host": host, "prefect.flow_run_id": "dead-flow"}
    parent = _run(client, experiment_id, dead)
    child = _run(client, experiment_id, dead, parent)
    client.create_registered_model(name := f"abandoned-{tmp_path.name}")
    (tmp_path / "model").mkdir()
    client.create_model_version(name, (tmp_path / "model").as_uri(), run_id=child)
    alive = _run(client, experiment_id, {"vitflow.pid": str(os.getpid()), "vitflow.host": host})
    elsewhere = _run(client, experiment_id, {"vitflow.pid": "1", "vitflow.host": "another-machine"})

    closed = close_abandoned_runs(client, experiment_id, stale_hours=12)

    assert {run.run_id for run in closed} == {parent, child}
    assert {run.flow_run_id for run in closed} == {"dead-flow"}
    for run_id in (parent, child):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and f"process {gone} on {host} is gone" in run.data.tags["end_reason"]
    assert client.get_run(alive).info.status == "RUNNING"
    assert client.get_run(elsewhere).info.status == "RUNNING"  # another machine: only once it is stale
    version = client.get_model_version(name, "1")
    assert version.tags["decision"] == "undecided" and "ended (KILLED) before deciding" in version.tags[
        "decision_reason"]
    assert [run.run_id for run in close_abandoned_runs(client, experiment_id, stale_hours=1e-9)] == [elsewhere]


def test_a_failed_flow_run_ends_its_runs_as_failed_with_the_reason(tmp_path):
    client = MlflowClient(tracking_uri(), tracking_uri())
    experiment_id = client.create_experiment(f"failed-{tmp_path.name}",
                                             artifact_location=(tmp_path / "artifacts").as_uri())
    tags = {"prefect.flow_run_id": f"flow-{tmp_path.name}"}
    parent = _run(client, experiment_id, tags)
    child = _run(client, experiment_id, tags, parent)
    finished = _run(client, experiment_id, tags, parent)
    client.set_terminated(finished)

    assert sorted(end_runs_of(f"flow-{tmp_path.name}", "FAILED", "out of memory")) == sorted([parent, child])
    for run_id in (parent, child):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and run.data.tags["end_reason"] == "out of memory"
    assert client.get_run(finished).info.status == "FINISHED"


def test_a_strategy_run_that_fails_while_training_ends_failed_with_what_it_logged(pneumonia_folder, tiny_hf_model,
                                                                                   monkeypatch):
    """The strategy's run exists before its training, so a training that fails leaves a run to end, as FAILED."""
    import tasks.train
    from flows.retrain import retrain

    def fails_after_two_steps(*args, observer, **kwargs):
        observer.step(1, {"train_loss": 0.69, "lr_head": 1e-3})
        observer.step(2, {"train_loss": 0.68, "lr_head": 1e-3})
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(tasks.train, "train_or_reuse", fails_after_two_steps)
    name = "fails-in-training"
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        retrain(overrides=[f"data.path={pneumonia_folder}", f"model.source={tiny_hf_model}",
                           "preprocess.image_size=null", "train.strategies=[full]", "export.precisions=[]",
                           f"registry.model_name={name}", f"mlflow.experiment={name}"])

    client = MlflowClient(tracking_uri(), tracking_uri())
    [run] = client.search_runs([client.get_experiment_by_name(name).experiment_id], "tags.strategy = 'full'")
    assert run.info.status == "FAILED" and "CUDA out of memory" in run.data.tags["end_reason"]
    assert [metric.value for metric in client.get_metric_history(run.info.run_id, "step/train_loss")] == [0.69, 0.68]
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


# --------------------------------------------------------------------------- caches that cannot poison


@pytest.fixture(scope="module")
def cache(pneumonia_folder, tiny_hf_model, tmp_path_factory):
    """A cache of its own (these tests damage it), with the manifest rows and data config it was built from."""
    return preprocess_folder(pneumonia_folder, tiny_hf_model, tmp_path_factory.mktemp("cache") / "data")


def same_cache(one: Path, other: Path) -> bool:
    return all(torch.equal(load_split(one, split).images, load_split(other, split).images)
               and torch.equal(load_split(one, split).labels, load_split(other, split).labels)
               and load_split(one, split).paths == load_split(other, split).paths for split in ("train", "val", "test"))


@pytest.mark.parametrize("damage", ["truncated images", "missing labels", "missing meta", "half-written meta"])
def test_a_broken_preprocessing_cache_is_detected_and_rebuilt(cache, pneumonia_folder, tmp_path, damage):
    cache_dir, rows, config = cache
    broken = tmp_path / "data"
    shutil.copytree(cache_dir, broken)
    if damage == "truncated images":  # a crash or a full disk mid-write
        images = broken / "val.images.npy"
        images.write_bytes(images.read_bytes()[: images.stat().st_size - 100])
    elif damage == "missing labels":
        (broken / "test.labels.npy").unlink()
    elif damage == "missing meta":
        (broken / "meta.json").unlink()
    else:
        (broken / "meta.json").write_text((broken / "meta.json").read_text()[:40])
    assert is_readable_cache(cache_dir) and not is_readable_cache(broken)

    preprocess_dataset(pd.DataFrame(rows), pneumonia_folder, config, LABELS, broken, workers=0, progress=False)

    assert is_readable_cache(broken) and same_cache(broken, cache_dir)


def test_parallel_and_single_process_preprocessing_write_identical_caches(cache, pneumonia_folder, tmp_path):
    cache_dir, rows, config = cache
    parallel = preprocess_dataset(pd.DataFrame(rows), pneumonia_folder, config, LABELS, tmp_path / "parallel",
                                  workers=2, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["parallel"]  # no staging folder left
    for file in sorted(cache_dir.iterdir()):
        assert (parallel / file.name).read_bytes() == file.read_bytes(), file.name


def test_a_training_is_reused_only_when_complete(cache, tiny_hf_model, tmp_path):
    cache_dir = cache[0]
    model = ModelConfig(source=str(tiny_hf_model))
    train = TrainConfig(strategies=["feature_extraction"], seed=0, epochs=2, batch_size=16, lr_backbone=1e-3,
                        lr_head=1e-3, weight_decay=0.0, warmup_ratio=0.1, crop_scale_min=0.6)
    resolved = resolve(train, "feature_extraction")
    out_dir = tmp_path / "fingerprint" / "feature_extraction"

    first = train_or_reuse(model, LABELS, None, cache_dir, resolved, out_dir, progress=False)
    assert sorted(path.name for path in out_dir.parent.iterdir()) == [".feature_extraction.lock", "feature_extraction"]
    assert first.model_dir == str(out_dir / "model")
    again = train_or_reuse(model, LABELS, None, cache_dir, resolved, out_dir, progress=False)
    assert again == first  # reused: the same timings, not a new training

    weights = next((out_dir / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # a crash or a full disk
    rebuilt = train_or_reuse(model, LABELS, None, cache_dir, resolved, out_dir, progress=False)
    assert rebuilt.history == first.history  # trained again, seeded: the same epochs
    assert load_model(rebuilt.model_dir).labels == LABELS
    (out_dir / RESULT_FILE).unlink()
    assert train_or_reuse(model, LABELS, None, cache_dir, resolved, out_dir, progress=False).history == first.history


# --------------------------------------------------------------------------- safe loading


def test_pickled_weights_are_refused_unless_allowed(tiny_hf_model, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for file in tiny_hf_model.iterdir():
        if not file.name.endswith(".safetensors"):
            (pickled / file.name).write_bytes(file.read_bytes())
    torch.save(load_model(str(tiny_hf_model)).model.state_dict(), pickled / "pytorch_model.bin")

    with pytest.raises(VitflowError, match=r"pickled: holds only pickled weights \(pytorch_model.bin\).*"
                                           r"model.allow_pickle: true"):
        load_model(str(pickled))
    assert load_model(str(pickled), allow_pickle=True).labels == load_model(str(tiny_hf_model)).labels

"""Training under `accelerate launch`: processes share the batches, end with one model, and the main one alone saves."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from vitflow.data.cache import load_split, preprocess_dataset
from vitflow.data.images import normalize
from vitflow.models import load_model
from vitflow.paths import PROJECT_ROOT

LABELS = ["normal", "pneumonia"]
BATCH_SIZE, WORLD_SIZE = 16, 2

# Runs the entry point given as its first argument and writes, per rank, what the test checks: optimizer
# steps, calls to ImageClassifier.save / TrainResult.save, the history and a digest of the final weights.
RECORDER = '''
import hashlib, json, os, runpy, sys
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_post_hook

import vitflow.training.loop
from vitflow.models import ImageClassifier

record = {"steps": 0, "saves": 0}
register_optimizer_step_post_hook(lambda *_: record.update(steps=record["steps"] + 1))


def counted(save):
    def wrapper(*args, **kwargs):
        record["saves"] += 1
        return save(*args, **kwargs)
    return wrapper


ImageClassifier.save = counted(ImageClassifier.save)
vitflow.training.loop.TrainResult.save = counted(vitflow.training.loop.TrainResult.save)
fine_tune = vitflow.training.loop.fine_tune


def recorded_fine_tune(model, *args, **kwargs):
    result = fine_tune(model, *args, **kwargs)
    weights = b"".join(tensor.detach().cpu().numpy().tobytes() for tensor in model.state_dict().values())
    record.update(weights=hashlib.sha256(weights).hexdigest(), history=result.history)
    return result


vitflow.training.loop.fine_tune = recorded_fine_tune
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    Path(os.environ["RANK_REPORTS"], os.environ["RANK"] + ".json").write_text(json.dumps(record))
'''


@pytest.fixture(scope="module")
def cache(pneumonia_folder, tiny_hf_model, tmp_path_factory) -> Path:
    rows = [{"path": str(path.relative_to(pneumonia_folder)), "label": path.parent.name, "split": path.parts[-3],
             "checksum": "", "status": "ok"} for path in sorted(pneumonia_folder.rglob("*.png"))]
    config = load_model(str(tiny_hf_model), LABELS).data_config
    return preprocess_dataset(pd.DataFrame(rows), pneumonia_folder, config, LABELS,
                              tmp_path_factory.mktemp("cache") / "data", progress=False)


UNUSED_BY_FULL = {"model.dinov2.embeddings.mask_token"}  # DDP must cope with a parameter `full` never uses


def test_accelerate_launch_trains_one_model_across_two_processes(tiny_dinov2, cache, tmp_path):
    """On DINOv2, the default model's family."""
    model_dir, unused = tiny_dinov2, UNUSED_BY_FULL
    recorder, out, reports = tmp_path / "recorder.py", tmp_path / "out", tmp_path / "ranks"
    recorder.write_text(RECORDER)
    reports.mkdir()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD_SIZE),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(recorder),
               str(PROJECT_ROOT / "scripts" / "train_distributed.py"), "--cache", str(cache),
               "--model", str(model_dir), "--strategy", "full", "--out", str(out),
               "--set", "train.epochs=1", "--set", f"train.batch_size={BATCH_SIZE}", "--set", "train.precision=fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "RANK_REPORTS": str(reports)}
    done = subprocess.run(command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    ranks = [json.loads((reports / f"{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    n_train = len(load_split(cache, "train").labels)
    batches = math.ceil(n_train / BATCH_SIZE)  # dealt round the processes, the last ones repeated to even them
    assert [rank["steps"] for rank in ranks] == [math.ceil(batches / WORLD_SIZE)] * WORLD_SIZE
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas in step
    assert ranks[0]["history"] == ranks[1]["history"]  # loss averaged, validated alike, on every rank
    assert [rank["saves"] for rank in ranks] == [2, 0]  # the model and the result, by rank 0 only
    assert sorted(path.name for path in out.iterdir()) == ["model", "result.json"]
    result = json.loads((out / "result.json").read_text())
    assert result["history"] == ranks[0]["history"] and json.loads(done.stdout)["history"] == result["history"]

    trained = load_model(result["model_dir"]).eval()
    initial = dict(load_model(str(model_dir), LABELS).named_parameters())
    unchanged = {name for name, parameter in trained.named_parameters() if torch.equal(parameter, initial[name])}
    assert unchanged == unused  # every parameter trained, except one the model never uses
    val = load_split(cache, "val")
    with torch.no_grad():
        logits = trained(normalize(val.images, trained.data_config))
    last = result["history"][-1]  # as if on one process
    assert last["val_loss"] == pytest.approx(F.cross_entropy(logits, val.labels).item(), rel=1e-5)
    assert last["val_accuracy"] == pytest.approx((logits.argmax(1) == val.labels).float().mean().item())

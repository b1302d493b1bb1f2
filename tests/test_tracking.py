"""What a strategy run shows in MLflow: metrics while it trains, its dataset, the experiment's kind, metric names that
put the headline first. A real (short) training of the tiny model, a real SQLite store."""

import json
import math
import time

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from vitflow.cards import HEADLINE_METRICS
from vitflow.config import ModelConfig, TrainConfig
from vitflow.data.versioning import DataVersion
from vitflow.evaluation import EvalResult
from vitflow.tracking import (
    EXPERIMENT_KIND,
    LiveMetrics,
    configure_mlflow,
    ensure_experiment,
    epoch_metrics,
    live_training,
    log_dataset,
    run_metrics,
    tracking_uri,
)
from vitflow.training.loop import train_or_reuse
from vitflow.training.strategies import resolve

LABELS = ["normal", "pneumonia"]


@pytest.fixture(scope="module")
def client() -> MlflowClient:
    return configure_mlflow()


@pytest.fixture(scope="module")
def experiment_id(client) -> str:
    return ensure_experiment(client, f"tracking-{time.time_ns()}")


@pytest.fixture(scope="module")
def cache(pneumonia_cache):
    return pneumonia_cache


class Watched(LiveMetrics):
    """LiveMetrics that, after the first epoch, reads the run as someone else would, with another client."""

    def epoch(self, row: dict) -> None:
        super().epoch(row)
        if row["epoch"] == 1:
            reader = MlflowClient(tracking_uri())
            self.seen = {name: [(metric.step, metric.value) for metric in reader.get_metric_history(self.run_id, name)]
                         for name in ("step/train_loss", "step/lr_head", "val/accuracy", "train/loss")}
            self.seen["status"] = reader.get_run(self.run_id).info.status


def test_metrics_show_while_the_model_trains_and_a_reused_training_logs_its_history(client, experiment_id, cache,
                                                                                   tiny_hf_model, tmp_path):
    model = ModelConfig(source=str(tiny_hf_model))
    train = TrainConfig(strategies=["full"], seed=0, epochs=3, batch_size=16, lr_backbone=1e-3, lr_head=1e-3,
                        weight_decay=0.0, warmup_ratio=0.1, crop_scale_min=0.6, augment=False, loader_workers=0)
    resolved = resolve(train, "full")
    out_dir = tmp_path / "fingerprint" / "full"
    run_id = client.create_run(experiment_id).info.run_id

    observer = Watched(client, run_id)
    result = train_or_reuse(model, LABELS, None, cache, resolved, out_dir, progress=False, observer=observer)
    observer.finish(result.history)

    steps_per_epoch = math.ceil(120 / 16)  # 120 training images
    seen = observer.seen
    assert seen["status"] == "RUNNING"  # read while the training went on
    assert [step for step, _ in seen["step/train_loss"]] == list(range(1, steps_per_epoch + 1))
    assert len(seen["step/lr_head"]) == steps_per_epoch and seen["step/lr_head"][0][1] > 0
    assert [step for step, _ in seen["val/accuracy"]] == [1] and [step for step, _ in seen["train/loss"]] == [1]
    assert client.get_run(run_id).data.tags["training"] == "trained"
    assert len(client.get_metric_history(run_id, "step/train_loss")) == 3 * steps_per_epoch
    assert [metric.step for metric in client.get_metric_history(run_id, "val/loss")] == [1, 2, 3]

    again = client.create_run(experiment_id).info.run_id
    with live_training(client, again) as observer:
        reused = train_or_reuse(model, LABELS, None, cache, resolved, out_dir, progress=False, observer=observer)
    observer.finish(reused.history)
    assert reused == result and client.get_run(again).data.tags["training"] == "reused"
    assert [(metric.step, metric.value) for metric in client.get_metric_history(again, "val/accuracy")] == [
        (row["epoch"], row["val_accuracy"]) for row in result.history]
    assert client.get_metric_history(again, "step/train_loss") == []  # steps are not stored with a training


def test_a_failed_training_keeps_what_it_logged_before_failing(client, experiment_id):
    run_id = client.create_run(experiment_id).info.run_id
    with pytest.raises(MemoryError), live_training(client, run_id) as observer:
        observer.step(1, {"train_loss": 0.7, "lr_head": 1e-3})
        observer.step(2, {"train_loss": 0.6, "lr_head": 1e-3})
        raise MemoryError("out of memory")
    assert [metric.value for metric in client.get_metric_history(run_id, "step/train_loss")] == [0.7, 0.6]


def test_the_dataset_is_the_manifest_with_the_dvc_hash_as_digest(client, experiment_id, tmp_path):
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"path": ["ants/1.jpg", "bees/2.jpg"], "label": ["ants", "bees"], "split": ["train", "test"],
                  "size": [1200, 3400], "status": ["ok", "ok"]}).to_csv(manifest, index=False)
    run_id = client.create_run(experiment_id).info.run_id

    for data_hash, digest in (("0123456789abcdef0123456789abcdef.dir", "0123456789abcdef0123456789abcdef.dir"),
                              ("content-" + "f" * 32, "f" * 32)):
        log_dataset(client, run_id, str(manifest), DataVersion(data_hash, True, False, "data"))
        inputs = client.get_run(run_id).inputs.dataset_inputs
        dataset = next(item.dataset for item in inputs if item.dataset.digest == digest)
        assert dataset.name == "data" and json.loads(dataset.source) == {"uri": str(manifest)}
        assert json.loads(dataset.profile)["num_rows"] == 2
        assert [(tag.key, tag.value) for tag in inputs[0].tags] == [("mlflow.data.context", "training")]


def test_experiments_are_classic_ml_not_genai(client):
    name = f"kind-{time.time_ns()}"
    created = ensure_experiment(client, name)
    assert client.get_experiment(created).tags["mlflow.experimentKind"] == "custom_model_development"

    older = client.create_experiment(f"{name}-older")  # made before vitflow set a kind
    assert ensure_experiment(client, f"{name}-older") == older
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == EXPERIMENT_KIND["mlflow.experimentKind"]


def test_headline_metrics_sort_before_every_other_name():
    """MLflow's compare view lists metrics sorted by character code: the headline first, then the rest."""
    from vitflow.training.loop import TrainResult

    evaluation = EvalResult(metrics={"test_accuracy": 0.9, "test_macro_f1": 0.88, "latency_ms_per_image": 3.0,
                                     "test_precision_ants": 0.9, "test_recall_bees": 0.8}, artifacts=[], predicted=[])
    train = TrainResult(strategy="full", settings={}, model_dir="m", history=[], best_epoch=2, stopped_early=False,
                        device="cpu", precision="fp32", attention="sdpa", trainable_params=10, total_params=20,
                        train_seconds=5.0, images_per_second=40.0, peak_rss_mb=100.0)
    names = [*run_metrics(evaluation, train), *epoch_metrics({"epoch": 1, "train_loss": 0.5, "val_loss": 0.4,
                                                              "val_accuracy": 0.8}),
             "step/train_loss", "step/lr_head", "precision/int8_top1_agreement", "system/cpu_utilization_percentage"]

    assert sorted(names)[:len(HEADLINE_METRICS)] == sorted(HEADLINE_METRICS)
    assert {"test/precision_ants", "test/recall_bees", "train/loss", "val/accuracy", "model/trainable_params"} <= set(
        names)

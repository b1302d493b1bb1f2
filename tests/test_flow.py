"""End to end: the real `retrain` flow on Prefect's ephemeral server, a SQLite MLflow store,
a tiny transformers ViT and a slice of real chest X-rays."""

import json
from pathlib import Path

import pytest
import torch
from mlflow.models import get_model_info
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

from flows.retrain import retrain
from vitflow.cards import HEADLINE_METRICS
from vitflow.cli import main
from vitflow.devices import resolve_attention, resolve_precision
from vitflow.loading import resolve_runner
from vitflow.serving import load_logged_model
from vitflow.tracking import tracking_uri

MODEL_NAME = "e2e-classifier"
STRATEGIES = {"full", "partial", "feature_extraction"}


@pytest.fixture(scope="module")
def base_overrides(pneumonia_folder, tiny_hf_model):
    return [f"data.path={pneumonia_folder}", f"model.source={tiny_hf_model}", "train.epochs=6",
            "train.feature_extraction.epochs=20", "train.lr_backbone=3e-3", "train.lr_head=3e-3",
            "train.partial.blocks=1", "train.augment=false", f"registry.model_name={MODEL_NAME}",
            "mlflow.experiment=e2e"]


def test_retrain_logs_registers_and_promotes_by_the_rule(base_overrides, pneumonia_folder, capsys, monkeypatch):
    client = MlflowClient(tracking_uri(), tracking_uri())
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # the tiny model's branches take seconds

    first = retrain(overrides=base_overrides)

    experiment_id = first["experiment_id"]
    parent = client.get_run(first["parent_run_id"])
    assert parent.data.tags["data_version"] == first["data_version"]
    assert parent.data.tags["git_commit"]
    assert parent.data.params["train.epochs"] == "6"
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {run.data.tags["strategy"] for run in children} == STRATEGIES
    for run in children:
        assert {"accuracy", "macro_f1", "best_epoch", "fit_seconds", "latency_ms", "model/trainable_params",
                "model/total_params"} <= set(run.data.metrics)
        epochs = 20 if run.data.tags["strategy"] == "feature_extraction" else 6
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == epochs
        assert len(client.get_metric_history(run.info.run_id, "val/accuracy")) == epochs
        assert run.info.status == "FINISHED" and run.data.tags["training"] == "trained"
        precision = run.data.tags["train_precision"]  # what train.precision=auto resolved to on this CPU
        assert run.data.tags["train_device"] == "cpu" and precision == resolve_precision("auto", torch.device("cpu"))
        assert run.data.tags["train_attention"] == (resolve_attention("auto", torch.device("cpu"), precision)
                                                    or "sdpa")  # the tiny ViT's own
        assert "system/cpu_utilization_percentage" in run.data.metrics
        own = [name for name in sorted(run.data.metrics) if not name.startswith("explain_")]  # tasks/explain.py's
        assert own[:len(HEADLINE_METRICS)] == sorted(HEADLINE_METRICS)
        assert run.inputs.dataset_inputs[0].dataset.digest == first["data_version"].removeprefix("content-")
        note = run.data.tags["mlflow.note.content"]
        assert note.startswith(f"{run.data.tags['strategy']} fine-tune of tiny-hf-vit") and "registered as" in note
        artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
        assert {"confusion_matrix.csv", "confusion_matrix.png", "learning_curve.png",
                "classification_report.csv", f"{first['data_version'].removeprefix('content-')[:8]}.csv"} <= artifacts
        assert run.data.tags["data_version"] == first["data_version"]
        assert [item.path for item in client.list_artifacts(run.info.run_id, "rollout")] == [
            "rollout/attention_rollout.png"]
        for precision in ("fp16", "bf16", "int8"):
            assert 0.9 <= run.data.metrics[f"precision/{precision}_top1_agreement"] <= 1.0
        for precision in ("fp16", "bf16"):  # int8 ONNX only pays off on real-sized models (tests/test_export.py)
            assert run.data.metrics[f"precision/{precision}_size_ratio_vs_fp32"] == pytest.approx(0.5, abs=0.05)

    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert len(versions) == 3
    assert {version.tags["strategy"] for version in versions} == STRATEGIES
    assert all(version.tags["data_version"] == first["data_version"] for version in versions)
    best = max(first["registered"], key=lambda item: item.metrics["test_accuracy"])
    assert first["decision"].promoted and first["decision"].challenger == best.version
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == best.version
    assert client.get_model_version(MODEL_NAME, best.version).tags["decision"] == "promoted to champion"
    assert best.metrics["test_accuracy"] > 0.6  # the tiny model learns something real

    # The parent run sums the flow run up, so the runs list is useful without expanding it.
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["accuracy"] == pytest.approx(best.metrics["test_accuracy"])
    assert {f"{item.strategy}_accuracy": item.metrics["test_accuracy"] for item in first["registered"]} == {
        name: value for name, value in parent.data.metrics.items() if name.endswith("_accuracy")}
    assert parent.data.metrics["champion_version"] == int(best.version)
    assert parent.data.tags["promotion"].startswith(f"v{best.version} promoted: no champion yet")
    assert parent.data.tags["mlflow.note.content"].startswith(f"**{MODEL_NAME} v{best.version} promoted")
    assert parent.data.tags["mlflow.source.name"].endswith("flows/retrain.py") and parent.data.tags["mlflow.user"]
    assert "champion_history.md" in {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert parent.inputs.dataset_inputs[0].dataset.digest == first["data_version"].removeprefix("content-")
    experiment = client.get_experiment(experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.vitflow"])  # what `vitflow ui`'s link opens
    assert view["selectedColumns"][:3] == ["metrics.`accuracy`", "metrics.`macro_f1`", "metrics.`full_accuracy`"]

    # Each version's description is a model card; its tags are few; its model has an input example.
    uri = f"models:/{MODEL_NAME}/{best.version}"
    version = client.get_model_version(MODEL_NAME, best.version)
    for fragment in (f"{best.strategy} fine-tune", f"`{first['data_version'].removeprefix('content-')[:8]}`",
                     "accuracy |", "**Decision**: promoted to champion: no champion yet",
                     f'mlflow.pyfunc.load_model("{uri}")', f"vitflow predict image.jpg --model {uri}"):
        assert fragment in version.description, fragment
    assert set(version.tags) == {"strategy", "data_version", "model_source", "labels", "image_size", "training_key",
                                 "test_accuracy", "test_macro_f1", "decision", "decision_reason", "promoted_by",
                                 "promoted_at", "promotion_reason", "previous_champion"}
    assert get_model_info(uri).saved_input_example_info["type"] == "dataframe"

    # Prefect: task runs named by model and strategy; the comparison artifact puts the headline metrics first.
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        [artifact] = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["strategy-comparison"])), flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    names = {run.name for run in runs}
    for strategy in STRATEGIES:
        assert f"tiny-hf-vit-{strategy}" in names
        assert {f"{step}-tiny-hf-vit-{strategy}" for step in (
            "start-run", "fine-tune", "evaluate", "log-and-register", "attention-rollout", "export", "log-exports",
            "finish-run")} <= names
    rows = json.loads(artifact.data)
    assert list(rows[0])[:5] == ["model", "strategy", "version", "champion", "accuracy"]
    assert all(Path(row["mlflow"]).is_dir() for row in rows)  # a local store: each run's artifact folder

    champion = load_logged_model(f"models:/{MODEL_NAME}@champion")
    assert champion.labels == ["normal", "pneumonia"]
    image = next((pneumonia_folder / "test" / "pneumonia").glob("*.png"))
    for precision in ("fp32", "int8"):
        assert main(["predict", str(image), "--model", f"models:/{MODEL_NAME}@champion", "--precision", precision,
                     "--top-k", "1"]) == 0
        assert capsys.readouterr().out.split()[1] in {"normal", "pneumonia"}
    int8 = resolve_runner(f"models:/{MODEL_NAME}@champion", "int8", MODEL_NAME)
    assert int8.compute == "cpu-int8-onnxruntime"  # predict --precision int8 ran the int8 export, not FP32

    # A worse model (nothing is learned) on the same data version must not take the champion alias.
    second = retrain(overrides=[*base_overrides, "train.lr_backbone=1e-12", "train.lr_head=1e-12"])
    assert not second["decision"].promoted
    assert second["decision"].champion_before == best.version
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == best.version
    assert client.get_model_version_by_alias(MODEL_NAME, "challenger").version == second["decision"].challenger
    assert "does not beat the champion" in client.get_model_version(
        MODEL_NAME, second["decision"].challenger).tags["decision_reason"]

    # Nothing changed since the first run: it records that and trains nothing.
    unchanged = retrain(overrides=base_overrides)
    assert unchanged["nothing_to_do"] and unchanged["same_as_run"] == first["parent_run_id"]
    assert client.get_run(unchanged["parent_run_id"]).data.tags["nothing_to_do"] == "true"
    assert retrain(overrides=base_overrides)["same_as_run"] == first["parent_run_id"]  # not the nothing-to-do run
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 6

    # Forced, the first configuration reuses the finished trainings and their versions instead of repeating them.
    third = retrain(overrides=base_overrides, force=True)
    seconds = {item.strategy: item.metrics["train_seconds"] for item in first["registered"]}
    assert {item.strategy: item.metrics["train_seconds"] for item in third["registered"]} == seconds
    assert {item.version for item in third["registered"]} == {item.version for item in first["registered"]}
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 6
    assert client.get_model_version(MODEL_NAME, best.version).tags["decision"] == "champion"


@pytest.mark.slow
def test_strategies_run_on_a_local_dask_cluster(base_overrides):
    """The strategy branches go to two Dask worker processes on loopback and still log and register."""
    from flows.retrain import task_runner

    client = MlflowClient(tracking_uri(), tracking_uri())
    overrides = [*base_overrides, "train.epochs=1", "train.feature_extraction.epochs=2", "export.precisions=[fp16]",
                 "registry.model_name=dask-classifier", "mlflow.experiment=dask"]
    summary = retrain.with_options(task_runner=task_runner("dask", workers=2))(overrides=overrides)
    assert {item.strategy for item in summary["registered"]} == STRATEGIES
    children = client.search_runs([summary["experiment_id"]],
                                  f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    assert {run.data.tags["strategy"] for run in children} == STRATEGIES
    assert len(client.search_model_versions("name='dask-classifier'")) == 3
    assert client.get_model_version_by_alias("dask-classifier", "champion").version == summary["decision"].challenger


def test_data_with_another_label_set_gets_its_own_registered_model(base_overrides, pneumonia_folder, tmp_path):
    """Renamed classes must not replace the champion of MODEL_NAME (whose classes a user's predict relies on)."""
    import shutil

    client = MlflowClient(tracking_uri(), tracking_uri())
    renamed = tmp_path / "renamed"
    for split in ("train", "val", "test"):
        for old, new in (("normal", "clear"), ("pneumonia", "opaque")):
            shutil.copytree(pneumonia_folder / split / old, renamed / split / new)
    champion_before = client.get_model_version_by_alias(MODEL_NAME, "champion").version

    summary = retrain(overrides=[*base_overrides, f"data.path={renamed}", "train.strategies=[feature_extraction]",
                                 "export.precisions=[]"])

    assert summary["model_name"].startswith(f"{MODEL_NAME}-clear-opaque-")
    version = client.get_model_version(summary["model_name"], summary["decision"].challenger)
    assert json.loads(version.tags["labels"]) == ["clear", "opaque"] and summary["decision"].promoted
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == champion_before


def test_an_npz_runs_through_the_flow(base_overrides, tmp_path):
    """PneumoniaMNIST as it arrives, arrays in an .npz: versioned, listed by index, trained, registered."""
    from conftest import pneumonia_npz

    client = MlflowClient(tracking_uri(), tracking_uri())
    path = pneumonia_npz(tmp_path / "pneumonia.npz", {"train": 40, "val": 10, "test": 15})

    summary = retrain(overrides=[*base_overrides, f"data.path={path}", "data.label_names=[normal, pneumonia]",
                                 "train.strategies=[feature_extraction]", "export.precisions=[]",
                                 "registry.model_name=npz-classifier", "mlflow.experiment=npz"])

    assert summary["data_version"].startswith("content-") and summary["skipped_images"] == 0
    [version] = client.search_model_versions("name = 'npz-classifier'")
    assert json.loads(version.tags["labels"]) == ["normal", "pneumonia"]
    assert summary["registered"][0].metrics["test_accuracy"] > 0.5


def test_several_models_fan_out_over_every_strategy(base_overrides, tiny_hf_model, tiny_deit_distilled, tiny_hybrid):
    """The tutorial's ViT vs DeiT vs hybrid: `--model a,b,c` trains every model under every strategy, and the runs,
    the registry, the parent's summary, the comparison and its plot cover them all."""
    from vitflow.reporting import accuracy_vs_time_figure, compare_runs

    client = MlflowClient(tracking_uri(), tracking_uri())
    models = {"tiny-hf-vit": str(tiny_hf_model), "tiny-deit-distilled": str(tiny_deit_distilled),
              "tiny-hybrid": str(tiny_hybrid)}
    strategies = ["partial", "feature_extraction"]
    branches = {(model, strategy) for model in models for strategy in strategies}

    summary = retrain(overrides=[*base_overrides, f"model.source={list(models.values())}",
                                 f"train.strategies={strategies}", "train.epochs=1",
                                 "train.feature_extraction.epochs=2", "export.precisions=[]",
                                 "preprocess.image_size=null",  # each at its own size: a hybrid's stem has its own
                                 "registry.model_name=zoo-classifier", "mlflow.experiment=zoo"])

    assert {(item.model, item.strategy) for item in summary["registered"]} == branches
    children = client.search_runs([summary["experiment_id"]],
                                  f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    short = summary["data_version"].removeprefix("content-")[:8]
    assert {run.info.run_name for run in children} == {f"{model}-{strategy}-{short}" for model, strategy in branches}
    for run in children:
        assert run.data.tags["model_source"] == run.data.params["model.source"] == models[run.data.tags["model"]]
        assert run.info.status == "FINISHED"
    versions = client.search_model_versions("name='zoo-classifier'")
    assert {(version.tags["model_source"], version.tags["strategy"]) for version in versions} == {
        (models[model], strategy) for model, strategy in branches}
    parent = client.get_run(summary["parent_run_id"])
    assert {f"{model}-{strategy}_accuracy" for model, strategy in branches} <= set(parent.data.metrics)
    assert parent.info.run_name == f"retrain-{'+'.join(models)}-{short}"

    frame = compare_runs(client, "zoo", "zoo-classifier", summary["parent_run_id"])
    assert set(zip(frame["model"], frame["strategy"], strict=True)) == branches and frame["version"].notna().all()
    legend = accuracy_vs_time_figure(frame).axes[0].get_legend()
    assert {text.get_text() for text in legend.get_texts()} == {f"{model} {strategy}" for model, strategy in branches}

    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[parent.data.tags["prefect.flow_run_id"]])))
    names = {run.name for run in runs}
    assert {f"preprocess-{model}" for model in models} <= names
    assert {f"fine-tune-{model}-{strategy}" for model, strategy in branches} <= names

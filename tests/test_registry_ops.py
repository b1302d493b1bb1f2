"""Registry by hand: listing versions, promoting and rolling back `champion` with a history, racing
promotions, comparing strategy runs, and the CLI commands. Versions are registered without training:
runs with params, metrics and tags in the test MLflow store, and versions pointing at empty folders."""

import io
import json
import re
import uuid
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from vitflow.cli import main
from vitflow.config import RegistryConfig
from vitflow.errors import VitflowError
from vitflow.registry import (
    HISTORY_MAX_CHARS,
    HISTORY_TAG,
    best_version,
    champion_number,
    list_versions,
    model_name_for,
    promote_version,
    read_history,
    rollback,
)
from vitflow.reporting import (
    accuracy_vs_time_figure,
    artifact_rows,
    compare_runs,
    plot_accuracy_vs_time,
    render,
    table_rows,
)
from vitflow.tracking import run_location, tracking_uri

DATA_A = "content-" + "a1" * 16
DATA_B = "b2" * 16 + ".dir"
COMPARE_COLUMNS = ["model", "strategy", "version", "champion", "accuracy", "macro_f1", "best_epoch", "fit_seconds",
                   "latency_ms", "trainable_params", "data_version", "epochs", "lr_backbone", "lr_head", "batch_size",
                   "duration_s", "run_name", "run_id", "location"]


@pytest.fixture(scope="module")
def client() -> MlflowClient:
    return MlflowClient(tracking_uri(), tracking_uri())


def build_registry(client: MlflowClient, tmp_path, versions: list[tuple[str, str, float]],
                   unregistered: tuple[str, ...] = ()) -> dict:
    """A fresh experiment and registered model (same unique name): one parent run, one nested run per
    (strategy, data_version, test_accuracy) registered as versions 1, 2, ..., and nested runs for the
    `unregistered` strategies. Returns the name, the parent run id and the run id of each version."""
    name = f"model-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(name, artifact_location=(tmp_path / "artifacts").as_uri())
    parent_id = client.create_run(experiment_id, run_name="retrain-tiny").info.run_id
    client.create_registered_model(name)
    run_ids = []
    for index, (strategy, data_version, accuracy) in enumerate([*versions, *((s, DATA_A, 0.5) for s in unregistered)]):
        run_id = client.create_run(experiment_id, run_name=f"tiny-{strategy}-{index}", tags={
            "mlflow.parentRunId": parent_id, "strategy": strategy, "data_version": data_version,
            "model_source": "/models/tiny-vit/"}).info.run_id
        params = {"train.epochs": 3, "train.lr_backbone": 2e-5, "train.lr_head": 1e-3, "train.batch_size": 16,
                  "strategy": strategy}
        metrics = {"accuracy": accuracy, "macro_f1": accuracy - 0.05, "best_epoch": 2,
                   "fit_seconds": 10.0 * (index + 1), "latency_ms": 2.5, "model/trainable_params": 1000 * (index + 1)}
        client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()],
                         metrics=[Metric(key, value, 0, 0) for key, value in metrics.items()])
        client.set_terminated(run_id)
        if index < len(versions):
            (tmp_path / f"model-{index}").mkdir()
            client.create_model_version(name, source=(tmp_path / f"model-{index}").as_uri(), run_id=run_id, tags={
                "strategy": strategy, "data_version": data_version, "run_id": run_id,
                "model_source": "/models/tiny-vit/", "test_accuracy": f"{accuracy:.6g}",
                "test_macro_f1": f"{accuracy - 0.05:.6g}", "decision": "not selected"})
            run_ids.append(run_id)
    client.set_terminated(parent_id)
    return {"name": name, "parent_id": parent_id, "run_ids": run_ids}


def test_list_versions_shows_every_version_with_its_aliases(client, tmp_path):
    name = build_registry(client, tmp_path, [("full", DATA_A, 0.8), ("partial", DATA_A, 0.9),
                                             ("feature_extraction", DATA_B, 0.7)])["name"]
    client.set_registered_model_alias(name, "champion", "2")
    client.set_registered_model_alias(name, "challenger", "2")
    client.set_registered_model_alias(name, "previous", "3")

    frame = list_versions(client, name)

    assert list(frame.columns) == ["version", "aliases", "model", "strategy", "data_version", "test_accuracy",
                                   "test_macro_f1", "decision", "created", "run_id"]
    assert frame["version"].tolist() == [1, 2, 3]
    assert frame["aliases"].tolist() == ["", "challenger,champion", "previous"]
    assert frame["model"].tolist() == ["tiny-vit"] * 3
    assert frame["strategy"].tolist() == ["full", "partial", "feature_extraction"]
    assert frame["data_version"].tolist() == ["a1a1a1a1", "a1a1a1a1", "b2b2b2b2"]
    assert frame["test_accuracy"].tolist() == pytest.approx([0.8, 0.9, 0.7])
    assert str(frame["created"].dt.tz) == "UTC"
    assert frame["run_id"].str.len().eq(32).all()


def test_promote_moves_champion_and_records_who_when_why(client, tmp_path):
    name = build_registry(client, tmp_path, [("full", DATA_A, 0.8), ("partial", DATA_A, 0.9)])["name"]

    first = promote_version(client, name, "1", "first one", "alice")
    second = promote_version(client, name, "v2", "better on the same data", "bob")

    assert champion_number(client, name) == "2"
    assert [(entry["version"], entry["previous"], entry["actor"], entry["reason"])
            for entry in read_history(client, name)] == [("1", None, "alice", "first one"),
                                                         ("2", "1", "bob", "better on the same data")]
    assert read_history(client, name)[-1] == second and first["id"] != second["id"]
    tags = client.get_model_version(name, "2").tags
    assert (tags["promoted_by"], tags["promotion_reason"], tags["previous_champion"]) == (
        "bob", "better on the same data", "1")
    assert datetime.fromisoformat(tags["promoted_at"]).utcoffset().total_seconds() == 0
    assert client.get_model_version(name, "1").tags["previous_champion"] == "none"
    with pytest.raises(VitflowError, match="v2 is already the champion"):
        promote_version(client, name, "2", "again", "bob")


def test_champion_moves_show_as_a_table_and_in_the_model_card(client, tmp_path):
    name = build_registry(client, tmp_path, [("full", DATA_A, 0.8), ("partial", DATA_A, 0.9)])["name"]
    client.update_registered_model(name, "Ants or bees, for the hive cameras.")

    promote_version(client, name, "1", "first one", "alice")
    promote_version(client, name, "2", "better | faster", "bob")

    description = client.get_registered_model(name).description
    own, table = description.split("### Champion history")
    assert own.strip() == "Ants or bees, for the hive cameras."  # the owner's text stays above the table
    rows = [line for line in table.strip().splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 2 and "v2" in rows[2] and "bob" in rows[2] and "v1" in rows[3]  # newest first
    assert "better \\| faster" in rows[2]
    card = client.get_model_version(name, "2").description
    assert "Promoted** by bob" in card and 'mlflow.pyfunc.load_model("models:/' + name + '/2")' in card


def test_promote_refuses_another_data_version_unless_forced(client, tmp_path):
    name = build_registry(client, tmp_path, [("full", DATA_A, 0.8), ("full", DATA_B, 0.95)])["name"]
    promote_version(client, name, "1", "first", "alice")

    with pytest.raises(VitflowError) as refused:
        promote_version(client, name, "2", "looks better", "alice")
    message = str(refused.value)
    assert "v2" in message and "b2b2b2b2" in message and "a1a1a1a1" in message and "--force" in message
    assert "\n" not in message
    assert champion_number(client, name) == "1" and len(read_history(client, name)) == 1

    promote_version(client, name, "2", "new data is the reference now", "alice", force=True)
    assert champion_number(client, name) == "2"


def test_unknown_models_and_versions_are_refused_by_name(client, tmp_path):
    name = build_registry(client, tmp_path, [("full", DATA_A, 0.8)])["name"]
    with pytest.raises(VitflowError, match="registered model 'no-such-model' not found"):
        promote_version(client, "no-such-model", "1", "why", "alice")
    with pytest.raises(VitflowError, match="registered model 'no-such-model' not found"):
        list_versions(client, "no-such-model")
    with pytest.raises(VitflowError, match=f"{name} has no version 7"):
        promote_version(client, name, "7", "why", "alice")
    with pytest.raises(VitflowError, match="expected a version number"):
        promote_version(client, name, "latest", "why", "alice")
    assert champion_number(client, name) is None


def test_rollback_walks_back_through_the_history(client, tmp_path):
    name = build_registry(client, tmp_path, [("full", DATA_A, 0.8), ("partial", DATA_A, 0.85),
                                             ("feature_extraction", DATA_A, 0.9)])["name"]
    with pytest.raises(VitflowError, match="has no champion"):
        rollback(client, name, "alice")
    promote_version(client, name, "1", "first", "alice")
    with pytest.raises(VitflowError, match="no earlier champion .* before v1"):
        rollback(client, name, "alice")
    promote_version(client, name, "2", "better", "alice")
    promote_version(client, name, "3", "better still", "alice")

    entry = rollback(client, name, "carol", "v3 misbehaves in production")
    assert (entry["version"], entry["previous"], entry["action"]) == ("2", "3", "rollback")
    assert champion_number(client, name) == "2"
    assert client.get_model_version(name, "2").tags["promotion_reason"] == "v3 misbehaves in production"
    rollback(client, name, "carol")
    assert champion_number(client, name) == "1"
    with pytest.raises(VitflowError, match="no earlier champion"):
        rollback(client, name, "carol")
    assert [entry["version"] for entry in read_history(client, name)] == ["1", "2", "3", "2", "1"]


@pytest.mark.parametrize("stage", ["read", "alias moved"])
def test_a_promotion_that_loses_a_race_raises_and_leaves_the_winner_champion(client, tmp_path, stage):
    name = build_registry(client, tmp_path, [("full", DATA_A, 0.8), ("partial", DATA_A, 0.85),
                                             ("feature_extraction", DATA_A, 0.9)])["name"]
    promote_version(client, name, "1", "first", "alice")

    def competing_promotion(at_stage: str) -> None:
        if at_stage == stage:  # another process promotes v3 from start to end right now
            promote_version(client, name, "3", "winner", "bob")

    with pytest.raises(VitflowError, match="to v2 lost a race: it was moved by bob .* champion is v3"):
        promote_version(client, name, "2", "loser", "alice", on_step=competing_promotion)

    assert champion_number(client, name) == "3"
    history = read_history(client, name)
    assert [(entry["version"], entry["actor"]) for entry in history] == [("1", "alice"), ("3", "bob")]
    assert "promoted_by" not in client.get_model_version(name, "2").tags


def test_history_keeps_the_latest_moves_that_fit(client, tmp_path):
    name = build_registry(client, tmp_path, [("full", DATA_A, 0.8), ("partial", DATA_A, 0.85)])["name"]
    for index in range(25):  # what the retrain flow's automatic promotions write, many times over
        version = "2" if index % 2 else "1"
        promote_version(client, name, version, f"move {index} " + "x" * 300, "retrain flow", force=True)

    text = client.get_registered_model(name).tags[HISTORY_TAG]
    history = json.loads(text)
    assert len(text) <= HISTORY_MAX_CHARS and 5 < len(history) < 25
    assert history[-1]["reason"].startswith("move 24 ") and history[-2]["reason"].startswith("move 23 ")
    assert client.get_model_version(name, "1").tags["promoted_by"] == "retrain flow"  # the last move: v2 -> v1
    assert rollback(client, name, "carol")["version"] == "2"


def test_best_version_is_chosen_on_the_champions_data_version(client, tmp_path):
    name = build_registry(client, tmp_path, [("full", DATA_A, 0.8), ("partial", DATA_A, 0.9),
                                             ("full", DATA_B, 0.99)])["name"]
    assert best_version(client, name, "accuracy").version == 3  # no champion: the best overall
    promote_version(client, name, "1", "first", "alice")
    assert best_version(client, name, "accuracy").version == 2
    with pytest.raises(VitflowError, match="has a test_auc tag"):
        best_version(client, name, "auc")


def test_compare_runs_has_a_row_per_strategy_run_and_marks_the_champion(client, tmp_path):
    registry = build_registry(client, tmp_path, [("full", DATA_A, 0.8), ("partial", DATA_A, 0.9)],
                              unregistered=("feature_extraction",))
    name = registry["name"]
    client.set_registered_model_alias(name, "champion", "2")

    frame = compare_runs(client, name, name)

    assert list(frame.columns) == COMPARE_COLUMNS
    assert frame["strategy"].tolist() == ["full", "partial", "feature_extraction"]  # not the parent run
    assert frame["run_id"].tolist()[:2] == registry["run_ids"]
    assert frame["version"].tolist()[:2] == [1, 2] and pd.isna(frame["version"].iloc[2])
    assert frame["champion"].tolist() == [False, True, False]
    assert frame["model"].unique().tolist() == ["tiny-vit"]
    assert frame["data_version"].unique().tolist() == ["a1a1a1a1"]
    assert frame[["epochs", "batch_size"]].iloc[0].tolist() == [3, 16]
    assert frame["lr_backbone"].iloc[0] == pytest.approx(2e-5)
    assert frame["accuracy"].tolist() == pytest.approx([0.8, 0.9, 0.5])
    assert frame["trainable_params"].tolist() == [1000, 2000, 3000]
    assert all(Path(location).is_absolute() for location in frame["location"])  # a local store: artifact folders
    assert (frame["duration_s"] >= 0).all()
    assert len(compare_runs(client, name, name, parent_run_id="no-such-run")) == 0
    with pytest.raises(VitflowError, match="experiment 'no-such-experiment' not found"):
        compare_runs(client, "no-such-experiment", name)


def test_the_comparison_renders_in_every_format_and_as_a_plot(client, tmp_path):
    name = build_registry(client, tmp_path, [("full", DATA_A, 0.8), ("partial", DATA_A, 0.9)],
                          unregistered=("feature_extraction",))["name"]
    frame = compare_runs(client, name, name)

    table = render(frame, "table")
    assert all(run_name in table for run_name in frame["run_name"])
    parsed = pd.read_csv(io.StringIO(render(frame, "csv")))
    assert list(parsed.columns) == COMPARE_COLUMNS
    assert parsed["accuracy"].tolist() == pytest.approx([0.8, 0.9, 0.5])
    markdown = render(frame, "md").splitlines()
    assert markdown[0].startswith("| model") and re.fullmatch(r"\|[-:|]+\|", markdown[1])
    assert len(markdown) == 2 + len(frame)
    assert "<table" in render(frame, "html")
    with pytest.raises(VitflowError, match="expected one of table, csv, md, html"):
        render(frame, "xlsx")

    path = plot_accuracy_vs_time(frame, tmp_path / "compare.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    legend = accuracy_vs_time_figure(frame).axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["feature_extraction", "full", "partial"]


def test_the_comparison_rows_are_plain_json(client, tmp_path):
    name = build_registry(client, tmp_path, [("full", DATA_A, 0.8)], unregistered=("partial",))["name"]

    rows = table_rows(compare_runs(client, name, name))

    assert json.loads(json.dumps(rows, allow_nan=False)) == rows  # no NaN, no numpy types
    assert [row["version"] for row in rows] == [1, None] and rows[0]["champion"] is False


def test_the_comparison_artifact_shows_headline_metrics_then_a_link_to_each_run(client, tmp_path, monkeypatch):
    name = build_registry(client, tmp_path, [("full", DATA_A, 0.8)])["name"]
    frame = compare_runs(client, name, name)

    [row] = artifact_rows(frame)
    assert list(row)[:10] == ["model", "strategy", "version", "champion", "accuracy", "macro_f1", "best_epoch",
                              "fit_seconds", "latency_ms", "trainable_params"]
    assert list(row)[10] == "mlflow" and row["mlflow"] == frame["location"][0]  # a local store: a plain path
    assert not row["mlflow"].startswith("file:") and "location" not in row

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000/")
    run = client.get_run(frame["run_id"][0])
    page = f"http://mlflow.example:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert run_location(run) == page
    [row] = artifact_rows(frame.assign(location=[page]))
    assert row["mlflow"] == f"[{run.info.run_name}]({page})"  # Prefect renders a table's text cells as Markdown


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`vitflow ARGV`: (exit code, stdout, stderr)."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(result: tuple[int, str, str], *fragments: str) -> None:
    code, _, err = result
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert all(fragment in err for fragment in fragments), err


def test_cli_lists_promotes_rolls_back_and_compares(client, tmp_path, capsys, monkeypatch):
    name = build_registry(client, tmp_path, [("full", DATA_A, 0.8), ("partial", DATA_A, 0.9),
                                             ("full", DATA_B, 0.99)])["name"]
    monkeypatch.chdir(tmp_path)

    code, out, _ = run_cli(["models", "--name", name], capsys)
    assert code == 0 and "no champion yet" in out

    code, out, _ = run_cli(["promote", "1", "--name", name, "--reason", "first"], capsys)
    assert code == 0 and f"champion of {name}: v1 (was none)" in out and "first" in out
    assert_one_line_error(run_cli(["promote", "3", "--name", name], capsys), "v3", "--force")
    assert_one_line_error(run_cli(["promote", "9", "--name", name], capsys), "no version 9")
    assert_one_line_error(run_cli(["models", "--name", "no-such-model"], capsys), "no-such-model")

    code, out, _ = run_cli(["promote", "--best", "--name", name], capsys)
    assert code == 0 and "v2 (was v1), promoted by" in out and "best test_accuracy (0.9)" in out
    code, out, _ = run_cli(["promote", "--best", "--name", name], capsys)
    assert code == 0 and "already the champion" in out

    code, out, _ = run_cli(["models", "--name", name], capsys)
    champion_rows = [line for line in out.splitlines() if line.lstrip().startswith("*")]
    assert code == 0 and len(champion_rows) == 1 and "champion" in champion_rows[0] and "partial" in champion_rows[0]

    code, out, _ = run_cli(["rollback", "--name", name, "--reason", "too slow"], capsys)
    assert code == 0 and "v1 (was v2), rolled back by" in out and "too slow" in out
    assert champion_number(client, name) == "1"

    code, out, err = run_cli(["compare", "--experiment", name, "--name", name, "--format", "csv"], capsys)
    assert code == 0 and len(pd.read_csv(io.StringIO(out))) == 3
    assert (tmp_path / "compare.png").is_file() and "compare.png" in err
    code, out, _ = run_cli(["compare", "--experiment", name, "--name", name, "--format", "html",
                            "--plot", str(tmp_path / "other.png")], capsys)
    assert code == 0 and "<table" in out and (tmp_path / "other.png").is_file()
    assert_one_line_error(run_cli(["compare", "--experiment", "no-such-experiment", "--name", name], capsys),
                          "no-such-experiment")


def test_promote_and_rollback_refuse_another_label_set_unless_forced(client, tmp_path):
    name = build_registry(client, tmp_path, [("full", DATA_A, accuracy) for accuracy in (0.8, 0.9, 0.7)])["name"]
    for version, labels in (("1", ["ants", "bees"]), ("2", ["ant colony", "bées"]), ("3", ["ants", "bees"])):
        client.set_model_version_tag(name, version, "labels", json.dumps(labels))
    promote_version(client, name, "1", "first", "alice")

    with pytest.raises(VitflowError, match=r"v2 predicts \['ant colony', 'bées'\] but the champion v1 predicts"):
        promote_version(client, name, "2", "scores higher", "alice")
    assert champion_number(client, name) == "1"
    promote_version(client, name, "3", "same classes", "alice")
    forced = promote_version(client, name, "2", "on purpose", "alice", force=True)
    assert forced["overrode"] == ["label set"] and champion_number(client, name) == "2"
    assert read_history(client, name)[-1]["overrode"] == ["label set"]

    with pytest.raises(VitflowError, match="pass --force to roll back anyway"):
        rollback(client, name, "bob")
    assert rollback(client, name, "bob", force=True)["version"] == "3"


def test_a_run_with_another_label_set_gets_its_own_registered_model_or_is_refused(client, tmp_path):
    name = build_registry(client, tmp_path, [("full", DATA_A, 0.8)])["name"]
    client.set_model_version_tag(name, "1", "labels", json.dumps(["ants", "bees"]))
    registry = RegistryConfig(model_name=name, metric="accuracy", min_improvement=0.0)

    assert model_name_for(client, registry, ["ants", "bees"]) == name
    other = model_name_for(client, registry, ["ant colony", "bées"])
    assert other.startswith(f"{name}-ant-colony-b") and other == model_name_for(client, registry, ["ant colony",
                                                                                                   "bées"])
    assert model_name_for(client, registry, ["ants", "bees", "wasps"]) not in (name, other)
    unused = registry.model_copy(update={"model_name": "never-registered"})
    assert model_name_for(client, unused, ["x", "y"]) == "never-registered"
    with pytest.raises(VitflowError, match=r"predicts \['ants', 'bees'\], this data has \['a', 'b'\]"):
        model_name_for(client, registry.model_copy(update={"other_labels": "refuse"}), ["a", "b"])

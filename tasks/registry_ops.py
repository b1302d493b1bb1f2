"""Look after the registered model by hand: list its versions, move `champion` with a history, compare strategies.

In: an `MlflowClient` (see `vitflow.tracking.configure_mlflow`), a registered model name, an experiment name.
Out: pandas tables of versions and strategy runs, a scatter plot, a Prefect table artifact, and
champion moves recorded in the registered-model tag `champion_history` (a JSON list, newest last)
and in tags on the version that took the alias.

Each history entry: id, version, previous (the champion it replaced), restores (where a rollback
from it goes), action (promote | rollback), actor, at (UTC ISO), reason.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task

from tasks.data import short_hash
from vitflow.cli_registry import FORMATS
from vitflow.errors import VitflowError

CHAMPION = "champion"
HISTORY_TAG = "champion_history"
# MLflow's client accepts registered-model tag values up to 100,000 characters, but its SQL
# stores keep them in a VARCHAR(5000) column (only SQLite ignores the length): stay under that.
HISTORY_MAX_CHARS = 5000
HISTORY_REASON_CHARS = 200  # the full reason goes on the version's `promotion_reason` tag
RUN_PARAMS = ("epochs", "lr_backbone", "lr_head", "batch_size", "partial_blocks")  # under `train.`
RUN_METRICS = ("test_accuracy", "test_macro_f1", "train_seconds", "latency_ms_per_image", "trainable_params")
MARKERS = "osD^v<>pPX"  # one per strategy in the plot, with a colour each
ARTIFACT_KEY = "strategy-comparison"


def registered_model(client: MlflowClient, model_name: str):
    """The registered model, or a VitflowError naming it when it does not exist."""
    try:
        return client.get_registered_model(model_name)
    except MlflowException:
        raise VitflowError(f"registered model {model_name!r} not found; run `vitflow run` first "
                           "or pass --name with a registered model") from None


def model_version(client: MlflowClient, model_name: str, version: str | int) -> ModelVersion:
    """Version `version` ("3" or "v3") of an existing registered model, or a VitflowError saying what exists."""
    number = str(version).removeprefix("v")
    if not number.isdigit():
        raise VitflowError(f"version {version!r}: expected a version number such as 3")
    try:
        return client.get_model_version(model_name, number)
    except MlflowException:
        raise VitflowError(f"{model_name} has no version {number}; see `vitflow models --name {model_name}`") from None


def champion_number(client: MlflowClient, model_name: str) -> str | None:
    """The version number holding `champion`, as a string, or None."""
    return _champion_of(client.get_registered_model(model_name))


def _champion_of(model) -> str | None:
    aliases = model.aliases  # {alias: version number}
    return str(aliases[CHAMPION]) if CHAMPION in aliases else None


def champion_version(client: MlflowClient, model_name: str) -> ModelVersion | None:
    """The version holding `champion`, or None."""
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def list_versions(client: MlflowClient, model_name: str) -> pd.DataFrame:
    """Every version of `model_name`, oldest first: version, aliases, strategy, data_version (8 chars),
    test_accuracy, test_macro_f1, decision, created (UTC), run_id."""
    aliases_by_version: dict[str, list[str]] = {}
    for alias, number in registered_model(client, model_name).aliases.items():
        aliases_by_version.setdefault(str(number), []).append(alias)
    rows = [{"version": int(version.version),
             "aliases": ",".join(sorted(aliases_by_version.get(str(version.version), []))),
             "strategy": version.tags.get("strategy", ""),
             "data_version": short_hash(version.tags.get("data_version")),
             "test_accuracy": version.tags.get("test_accuracy"), "test_macro_f1": version.tags.get("test_macro_f1"),
             "decision": version.tags.get("decision", ""),
             "created": pd.Timestamp(version.creation_timestamp, unit="ms", tz="UTC"),
             "run_id": version.tags.get("run_id") or version.run_id or ""}
            for version in client.search_model_versions(f"name='{model_name}'")]
    columns = ["version", "aliases", "strategy", "data_version", "test_accuracy", "test_macro_f1", "decision",
               "created", "run_id"]
    frame = pd.DataFrame(rows, columns=columns).sort_values("version", ignore_index=True)
    for column in ("test_accuracy", "test_macro_f1"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def read_history(client: MlflowClient, model_name: str) -> list[dict]:
    """The champion moves recorded on the registered model, oldest first ([] when none)."""
    return _history_of(registered_model(client, model_name))


def _history_of(model) -> list[dict]:
    text = model.tags.get(HISTORY_TAG)
    if not text:
        return []
    try:
        history = json.loads(text)
    except json.JSONDecodeError:
        history = None
    if not isinstance(history, list):
        raise VitflowError(f"registered model {model.name}: tag {HISTORY_TAG} is not a JSON list; "
                           "fix or delete the tag in the MLflow UI")
    return history


def write_history(client: MlflowClient, model_name: str, history: list[dict]) -> None:
    """Store `history`, dropping the oldest entries until it fits in HISTORY_MAX_CHARS."""
    kept = list(history)
    text = json.dumps(kept, separators=(",", ":"))
    while len(text) > HISTORY_MAX_CHARS and len(kept) > 1:
        kept.pop(0)
        text = json.dumps(kept, separators=(",", ":"))
    client.set_registered_model_tag(model_name, HISTORY_TAG, text)


def history_entry(version: str, previous: str | None, restores: str | None, action: str, actor: str,
                  reason: str) -> dict:
    """One champion move, with a unique id and the current UTC time."""
    return {"id": uuid.uuid4().hex[:12], "version": str(version), "previous": previous, "restores": restores,
            "action": action, "actor": actor, "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "reason": reason[:HISTORY_REASON_CHARS]}


def tag_promoted_version(client: MlflowClient, model_name: str, entry: dict, reason: str) -> None:
    """Record on the version who moved `champion` to it, when, why and from which version."""
    tags = {"promoted_by": entry["actor"], "promoted_at": entry["at"], "promotion_reason": reason,
            "previous_champion": entry["previous"] or "none"}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, entry["version"], key, value)


def promote_version(client: MlflowClient, model_name: str, version: str | int, reason: str, actor: str,
                    force: bool = False, on_step: Callable[[str], None] | None = None) -> dict:
    """Move `champion` to `version` and record it; returns the history entry.

    Refuses (VitflowError) an unknown model or version, the current champion, and, unless `force`,
    a version evaluated on another data version than the champion (their scores are not comparable).
    See `move_champion` for how racing promotions are detected; `on_step(stage)` is called at its
    stages "read" and "alias moved" so tests can interleave a competing promotion.
    """
    model = registered_model(client, model_name)
    target = model_version(client, model_name, version)
    number = str(target.version)
    history, current = _history_of(model), _champion_of(model)
    if current == number:
        raise VitflowError(f"v{number} is already the champion of {model_name}; nothing to do")
    if current is not None and not force:
        ours = target.tags.get("data_version")
        theirs = client.get_model_version(model_name, current).tags.get("data_version")
        if ours != theirs:
            raise VitflowError(f"v{number} of {model_name} was evaluated on data version "
                               f"{short_hash(ours) or 'unknown'}, the champion v{current} on "
                               f"{short_hash(theirs) or 'unknown'}, so their scores are not comparable; "
                               "retrain on the current data, or pass --force to promote it anyway")
    entry = history_entry(number, current, current, "promote", actor, reason)
    move_champion(client, model_name, entry, history, on_step)
    tag_promoted_version(client, model_name, entry, reason)
    return entry


def rollback(client: MlflowClient, model_name: str, actor: str, reason: str = "rollback") -> dict:
    """Move `champion` back to the version that held it before the current one; returns the history entry.

    Successive rollbacks walk further back (v1 -> v2 -> v3, rollback: v2, rollback: v1). No data
    version check: it restores a former champion. Refuses (VitflowError) when there is no champion
    or no earlier champion recorded in the history.
    """
    model = registered_model(client, model_name)
    history, current = _history_of(model), _champion_of(model)
    if current is None:
        raise VitflowError(f"{model_name} has no champion; nothing to roll back")
    made_current = _latest_index(history, current, len(history))
    target = history[made_current]["restores"] if made_current is not None else None
    if target is None:
        raise VitflowError(f"no earlier champion of {model_name} is recorded before v{current}; "
                           "promote a version with `vitflow promote VERSION` instead")
    model_version(client, model_name, target)  # it may have been deleted since
    made_target = _latest_index(history, target, made_current)
    restores = history[made_target]["restores"] if made_target is not None else None
    entry = history_entry(target, current, restores, "rollback", actor, reason)
    move_champion(client, model_name, entry, history)
    tag_promoted_version(client, model_name, entry, reason)
    return entry


def _latest_index(history: list[dict], version: str, before: int) -> int | None:
    """Index of the latest entry before `before` that made `version` champion, or None."""
    return next((index for index in range(before - 1, -1, -1) if history[index]["version"] == version), None)


def move_champion(client: MlflowClient, model_name: str, entry: dict, history: list[dict],
                  on_step: Callable[[str], None] | None = None) -> None:
    """Point `champion` at entry["version"] and append `entry` to `history` (as read by the caller
    before deciding), unless another move was recorded since: then raise a VitflowError.

    MLflow has no compare-and-set for aliases or tags, so this is an optimistic check: move the
    alias, re-read the history and append only if its last entry is still the one the caller read,
    then re-read and require our entry to follow that same entry. The loser of a race puts the
    alias back on the winner's version if it overwrote it. Residual windows: (1) between the
    loser's alias move and its restore, readers can briefly see the loser's version as champion,
    and a promotion starting then records it as the previous champion (where a rollback goes);
    (2) the history tag is itself read-modify-write, so two writers that both re-read it before
    either writes can both pass, and if the first also verifies before the second writes, the
    second's write drops the first's entry and both report success (one database round trip wide);
    (3) a process that dies between moving the alias and writing the history leaves an unrecorded move.
    """
    step = on_step or (lambda stage: None)
    last_id = history[-1]["id"] if history else None
    step("read")
    client.set_registered_model_alias(model_name, CHAMPION, entry["version"])
    step("alias moved")
    latest = read_history(client, model_name)
    if (latest[-1]["id"] if latest else None) == last_id:
        write_history(client, model_name, [*latest, entry])
        latest = read_history(client, model_name)
    ids = [item["id"] for item in latest]
    position = ids.index(entry["id"]) if entry["id"] in ids else None
    if position is not None and (ids[position - 1] if position > 0 else None) == last_id:
        return
    winner = next((item for item in reversed(latest) if item["id"] != entry["id"]), None)
    holder = winner["version"] if winner else entry["previous"]
    if champion_number(client, model_name) == entry["version"] and holder != entry["version"]:
        if holder is None:
            client.delete_registered_model_alias(model_name, CHAMPION)
        else:
            client.set_registered_model_alias(model_name, CHAMPION, holder)
    by = f" by {winner['actor']} at {winner['at']}" if winner else ""
    now = f"champion is v{holder}" if holder else "there is no champion"
    raise VitflowError(f"moving champion of {model_name} to v{entry['version']} lost a race: it was moved{by} "
                       f"while this ran, and {now}; check `vitflow models` and retry if still wanted")


def best_version(client: MlflowClient, model_name: str, metric: str) -> ModelVersion:
    """The version with the highest `test_<metric>` tag among those evaluated on the champion's data
    version (all versions when there is no champion); a VitflowError when none has the tag."""
    registered_model(client, model_name)
    key = f"test_{metric}"
    versions = [version for version in client.search_model_versions(f"name='{model_name}'") if key in version.tags]
    current = champion_version(client, model_name)
    if current is not None:
        data_version = current.tags.get("data_version")
        versions = [version for version in versions if version.tags.get("data_version") == data_version]
    if not versions:
        among = f"evaluated on the data version of the champion v{current.version}" if current else "at all"
        raise VitflowError(f"no version of {model_name} {among} has a {key} tag; "
                           "run `vitflow run` or promote a version by number")
    return max(versions, key=lambda version: (float(version.tags[key]), int(version.version)))


def compare_runs(client: MlflowClient, experiment_name: str, model_name: str,
                 parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per strategy run (nested run) of the experiment, oldest first, or of one flow run when
    `parent_run_id` is given: run_name, model, strategy, data_version, key train params, test metrics,
    train time, latency, trainable params, duration_s, version (registered, when any), champion, run_id."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise VitflowError(f"experiment {experiment_name!r} not found; run `vitflow run` first or pass --experiment")
    versions = client.search_model_versions(f"name='{model_name}'")
    version_by_run = {version.tags.get("run_id") or version.run_id: int(version.version) for version in versions}
    champion = champion_number(client, model_name) if versions else None
    rows = []
    only = f"tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id else ""
    for run in _all_runs(client, experiment.experiment_id, only):
        if "mlflow.parentRunId" not in run.data.tags:
            continue
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        version = version_by_run.get(run.info.run_id)
        rows.append({"run_name": run.info.run_name,
                     "model": Path(tags.get("model_source", "").rstrip("/")).name,
                     "strategy": tags.get("strategy", ""),
                     "data_version": short_hash(tags.get("data_version")),
                     **{name: _number(params.get(f"train.{name}")) for name in RUN_PARAMS},
                     **{name: metrics.get(name) for name in RUN_METRICS},
                     "duration_s": (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None,
                     "version": version, "champion": version is not None and str(version) == champion,
                     "run_id": run.info.run_id, "start_time": run.info.start_time})
    columns = ["run_name", "model", "strategy", "data_version", *RUN_PARAMS, *RUN_METRICS, "duration_s", "version",
               "champion", "run_id"]
    frame = pd.DataFrame(rows, columns=[*columns, "start_time"]).sort_values("start_time", ignore_index=True)
    frame["version"] = frame["version"].astype("Int64")
    for name in (*RUN_METRICS, "duration_s"):
        frame[name] = frame[name].astype(float)
    return frame[columns]


def _all_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list:
    """Every run of the experiment that matches `filter_string`, following MLflow's pages."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _number(text: str | None) -> int | float | str | None:
    """A logged param ("3", "2e-05") as a number when it is one."""
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return text


def render(frame: pd.DataFrame, fmt: str) -> str:
    """`frame` as text: "table" (aligned), "csv", "md" (Markdown) or "html"."""
    if fmt == "table":
        return frame.to_string(index=False, float_format=lambda value: f"{value:.4g}")
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "md":
        return frame.to_markdown(index=False, floatfmt=".4g")
    if fmt == "html":
        return frame.to_html(index=False, float_format=lambda value: f"{value:.4g}")
    raise VitflowError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")


def plot_accuracy_vs_time(frame: pd.DataFrame, path: Path | str) -> Path:
    """Scatter of test accuracy against training time from `compare_runs`, one colour and marker per
    strategy, each point labelled with its registered version (or run name); written as PNG to `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.add_subplot()
    for index, (strategy, runs) in enumerate(frame.groupby("strategy", sort=True)):
        axes.scatter(runs["train_seconds"], runs["test_accuracy"], color=f"C{index % 10}",
                     marker=MARKERS[index % len(MARKERS)], s=60, label=strategy)
        for _, run in runs.iterrows():
            label = f"v{run['version']}" if pd.notna(run["version"]) else run["run_name"]
            if run["champion"]:
                label += " (champion)"
            axes.annotate(label, (run["train_seconds"], run["test_accuracy"]), xytext=(5, 4),
                          textcoords="offset points", fontsize=8)
    axes.set_xlabel("training time (s)")
    axes.set_ylabel("test accuracy")
    axes.set_title("Test accuracy vs training time, per strategy")
    axes.grid(alpha=0.3)
    axes.legend(title="strategy")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=100)
    return path


def publish_comparison_artifact(frame: pd.DataFrame) -> None:
    """Publish `frame` (from `compare_runs`) as the Prefect table artifact `strategy-comparison`.
    Values go through JSON first: NaN and missing become null, numpy numbers plain ones."""
    from prefect.artifacts import create_table_artifact

    rows = json.loads(frame.to_json(orient="records", date_format="iso"))
    create_table_artifact(table=rows, key=ARTIFACT_KEY,
                          description="Strategies compared: test metrics, training time, latency, registry version")


@task(name="publish-comparison")
def publish_comparison_task(experiment_name: str, model_name: str, parent_run_id: str) -> None:
    """The flow run's strategy runs as the `strategy-comparison` table artifact."""
    from vitflow.tracking import configure_mlflow

    publish_comparison_artifact(compare_runs(configure_mlflow(), experiment_name, model_name, parent_run_id))

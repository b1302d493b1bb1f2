"""The model registry: promotion by rule, champion moves with a history, rollback, listing versions.

Each flow run's best new version gets the alias `challenger`; it takes `champion` only when there is none
yet, or when it beats the champion on the test split of the same data version by more than
`registry.min_improvement` (a champion evaluated on other data is re-scored on this test split first).

In: an `MlflowClient` (see `vitflow.tracking.configure_mlflow`) and a registered model name.
Out: a table of versions, and champion moves recorded in the registered-model tag `champion_history`
(a JSON list, newest last), as a table in the registered model's description, and in tags on the version that
took the alias. Each version's description is its model card, rewritten when a decision about it is recorded.

Each history entry: id, version, previous (the champion it replaced), restores (where a rollback
from it goes), action (promote | rollback), actor, at (UTC ISO), reason.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from vitflow.cards import flow_run_note, history_table
from vitflow.config import RegistryConfig, model_label
from vitflow.data.cache import load_split
from vitflow.data.versioning import short_hash
from vitflow.errors import VitflowError
from vitflow.evaluation import evaluate_model
from vitflow.tracking import RegisteredVersion, branch_label, log_values, refresh_model_card

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
# MLflow's client accepts registered-model tag values up to 100,000 characters, but its SQL
# stores keep them in a VARCHAR(5000) column (only SQLite ignores the length): stay under that.
HISTORY_MAX_CHARS = 5000
HISTORY_REASON_CHARS = 200  # the full reason goes on the version's `promotion_reason` tag
HISTORY_HEADING = "### Champion history"  # in the registered model's description; text above it is kept


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
    """Every version of `model_name`, oldest first: version, aliases, model, strategy, data_version (8 chars),
    test_accuracy, test_macro_f1, decision, created (UTC), run_id."""
    aliases_by_version: dict[str, list[str]] = {}
    for alias, number in registered_model(client, model_name).aliases.items():
        aliases_by_version.setdefault(str(number), []).append(alias)
    rows = [{"version": int(version.version),
             "aliases": ",".join(sorted(aliases_by_version.get(str(version.version), []))),
             "model": model_label(version.tags.get("model_source", "")),
             "strategy": version.tags.get("strategy", ""),
             "data_version": short_hash(version.tags.get("data_version")),
             "test_accuracy": version.tags.get("test_accuracy"), "test_macro_f1": version.tags.get("test_macro_f1"),
             "decision": version.tags.get("decision", ""),
             "created": pd.Timestamp(version.creation_timestamp, unit="ms", tz="UTC"),
             "run_id": version.tags.get("run_id") or version.run_id or ""}
            for version in client.search_model_versions(f"name='{model_name}'")]
    columns = ["version", "aliases", "model", "strategy", "data_version", "test_accuracy", "test_macro_f1", "decision",
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
    """Store `history`, dropping the oldest entries until it fits in HISTORY_MAX_CHARS, and show it as a table
    in the registered model's description."""
    kept = list(history)
    text = json.dumps(kept, separators=(",", ":"))
    while len(text) > HISTORY_MAX_CHARS and len(kept) > 1:
        kept.pop(0)
        text = json.dumps(kept, separators=(",", ":"))
    client.set_registered_model_tag(model_name, HISTORY_TAG, text)
    own = (client.get_registered_model(model_name).description or "").split(HISTORY_HEADING)[0].rstrip()
    client.update_registered_model(model_name, f"{own}\n\n{HISTORY_HEADING}\n\n{history_table(kept)}".lstrip())


def history_entry(version: str, previous: str | None, restores: str | None, action: str, actor: str,
                  reason: str, overrode: list[str] | None = None) -> dict:
    """One champion move, with a unique id and the current UTC time; `overrode`: the checks --force overrode."""
    entry = {"id": uuid.uuid4().hex[:12], "version": str(version), "previous": previous, "restores": restores,
             "action": action, "actor": actor, "at": datetime.now(UTC).isoformat(timespec="seconds"),
             "reason": reason[:HISTORY_REASON_CHARS]}
    return {**entry, "overrode": overrode} if overrode else entry


def labels_of(version: ModelVersion) -> list[str] | None:
    """The label set a version predicts (its `labels` tag), or None for a version registered without one."""
    text = version.tags.get("labels")
    return json.loads(text) if text else None


def not_comparable(target: ModelVersion, champion: ModelVersion, check_data: bool = True) -> dict[str, str]:
    """Why `target` may not replace `champion` without --force: {check: explanation}, empty when it may."""
    problems = {}
    ours, theirs = labels_of(target), labels_of(champion)
    if ours is not None and theirs is not None and ours != theirs:
        problems["label set"] = (f"v{target.version} predicts {ours} but the champion v{champion.version} predicts "
                                 f"{theirs}, so it cannot stand in for it")
    ours, theirs = target.tags.get("data_version"), champion.tags.get("data_version")
    if check_data and ours != theirs:
        problems["data version"] = (f"v{target.version} was evaluated on data version {short_hash(ours) or 'unknown'}, "
                                    f"the champion v{champion.version} on {short_hash(theirs) or 'unknown'}, so their "
                                    "scores are not comparable")
    return problems


def tag_promoted_version(client: MlflowClient, model_name: str, entry: dict, reason: str) -> None:
    """Record on the version who moved `champion` to it, when, why and from which version."""
    tags = {"promoted_by": entry["actor"], "promoted_at": entry["at"], "promotion_reason": reason,
            "previous_champion": entry["previous"] or "none"}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, entry["version"], key, value)
    refresh_model_card(client, model_name, entry["version"])


def promote_version(client: MlflowClient, model_name: str, version: str | int, reason: str, actor: str,
                    force: bool = False, on_step: Callable[[str], None] | None = None, rescored: bool = False) -> dict:
    """Move `champion` to `version` and record it; returns the history entry.

    Refuses (VitflowError) an unknown model or version, the current champion, and, unless `force` (recorded
    in the entry), a version with another label set than the champion's, or one evaluated on another data
    version (`rescored`: the caller compared both on the same test split itself).
    See `move_champion` for how racing promotions are detected; `on_step(stage)` is called at its
    stages "read" and "alias moved" so tests can interleave a competing promotion.
    """
    model = registered_model(client, model_name)
    target = model_version(client, model_name, version)
    number = str(target.version)
    history, current = _history_of(model), _champion_of(model)
    if current == number:
        raise VitflowError(f"v{number} is already the champion of {model_name}; nothing to do")
    problems = {}
    if current is not None:
        problems = not_comparable(target, client.get_model_version(model_name, current), check_data=not rescored)
    if problems and not force:
        raise VitflowError(f"{model_name}: {next(iter(problems.values()))}; pass --force to promote it anyway")
    entry = history_entry(number, current, current, "promote", actor, reason, list(problems))
    move_champion(client, model_name, entry, history, on_step)
    tag_promoted_version(client, model_name, entry, reason)
    return entry


def rollback(client: MlflowClient, model_name: str, actor: str, reason: str = "rollback", force: bool = False) -> dict:
    """Move `champion` back to the version that held it before the current one; returns the history entry.

    Successive rollbacks walk further back (v1 -> v2 -> v3, rollback: v2, rollback: v1). No data
    version check: it restores a former champion. Refuses (VitflowError) when there is no champion,
    no earlier champion recorded in the history, or, unless `force`, one with another label set.
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
    restored = model_version(client, model_name, target)  # it may have been deleted since
    problems = not_comparable(restored, client.get_model_version(model_name, current), check_data=False)
    if problems and not force:
        raise VitflowError(f"{model_name}: {problems['label set']}; pass --force to roll back anyway")
    made_target = _latest_index(history, target, made_current)
    restores = history[made_target]["restores"] if made_target is not None else None
    entry = history_entry(target, current, restores, "rollback", actor, reason, list(problems))
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


@dataclass
class PromotionDecision:
    challenger: str  # model version
    champion_before: str | None
    promoted: bool
    reason: str


def decide_promotion(challenger_score: float, champion_score: float | None, min_improvement: float) -> tuple[bool, str]:
    """Whether the challenger takes `champion`, and why (the scores are on the same test split)."""
    if champion_score is None:
        return True, "no champion yet"
    if challenger_score > champion_score + min_improvement:
        return True, f"beats the champion: {challenger_score:.4f} > {champion_score:.4f} + {min_improvement}"
    return False, f"does not beat the champion: {challenger_score:.4f} <= {champion_score:.4f} + {min_improvement}"


def promote(client: MlflowClient, model_name: str, candidates: list[RegisteredVersion], metric: str,
            min_improvement: float, data_version: str, champion_score_on_current_test) -> PromotionDecision:
    """Give the best candidate `challenger`, and `champion` when `decide_promotion` says so.

    `champion_score_on_current_test(version)` scores the current champion on this flow run's
    test split; it is called only when the champion was evaluated on another data version.
    """
    key = f"test_{metric}"
    best = max(candidates, key=lambda candidate: candidate.metrics[key])
    client.set_registered_model_alias(model_name, CHALLENGER, best.version)
    current = champion_version(client, model_name)
    kept = current is not None and str(current.version) == str(best.version)
    if current is None:
        promoted, reason = True, "no champion yet"
    elif kept:
        promoted, reason = False, "already the champion"
    elif "label set" in not_comparable(client.get_model_version(model_name, best.version), current, check_data=False):
        promoted, reason = False, f"the champion v{current.version} predicts another label set; not comparable"
    else:
        if current.tags.get("data_version") == data_version and key in current.tags:
            champion_score = float(current.tags[key])
        else:
            champion_score = champion_score_on_current_test(current)
        promoted, reason = decide_promotion(best.metrics[key], champion_score, min_improvement)
    if promoted:
        # rescored: a champion from another data version was scored on this run's test split above
        promote_version(client, model_name, best.version, reason, "retrain flow", rescored=True)
    for candidate in candidates:
        if candidate is best:
            decision = "promoted to champion" if promoted else "champion" if kept else "challenger, not promoted"
            why = reason
        else:
            decision, why = "not selected", f"{key} {candidate.metrics[key]:.4f} below the best new version"
        client.set_model_version_tag(model_name, candidate.version, "decision", decision)
        client.set_model_version_tag(model_name, candidate.version, "decision_reason", why)
        refresh_model_card(client, model_name, candidate.version)
    return PromotionDecision(challenger=best.version, champion_before=current.version if current else None,
                             promoted=promoted, reason=reason)


def champion_rescorer(model_name: str, metric: str, cache_dir: str, batch_size: int,
                      out_dir: Path | str) -> Callable[[ModelVersion], float]:
    """For `promote`: scores a registered version on the test split of the preprocessed `cache_dir`."""
    from vitflow.serving import load_logged_model

    def score(version: ModelVersion) -> float:
        model = load_logged_model(f"models:/{model_name}/{version.version}")
        result = evaluate_model(model, load_split(cache_dir, "test"), out_dir, batch_size)
        return result.metrics[f"test_{metric}"]

    return score


def record_decision(client: MlflowClient, parent_run_id: str, model_name: str, candidates: list[RegisteredVersion],
                    decision: PromotionDecision) -> None:
    """Sum up the flow run on its parent run and end it as finished: the challenger's test accuracy and macro-F1,
    each branch's accuracy (`<strategy>_accuracy`, or `<model>-<strategy>_accuracy` with several models) and the
    champion's version as metrics; the decision as the `promotion` tag and in its description, with a row per
    branch; the champion history as a table artifact."""
    outcome = "promoted" if decision.promoted else "not promoted"
    promotion = f"v{decision.challenger} {outcome}: {decision.reason}"
    challenger = next(item for item in candidates if str(item.version) == str(decision.challenger))
    models = [item.model for item in candidates]
    champion = champion_number(client, model_name)
    metrics = {"accuracy": challenger.metrics["test_accuracy"], "macro_f1": challenger.metrics["test_macro_f1"],
               **{f"{branch_label(item.model, item.strategy, models)}_accuracy": item.metrics["test_accuracy"]
                  for item in candidates},
               **({"champion_version": int(champion)} if champion else {})}
    log_values(client, parent_run_id, metrics=metrics)
    rows = [{"model": item.model, "strategy": item.strategy, "version": f"{model_name} v{item.version}",
             "accuracy": item.metrics["test_accuracy"], "macro_f1": item.metrics["test_macro_f1"],
             "fit_seconds": item.metrics["train_seconds"]} for item in candidates]
    client.set_tag(parent_run_id, "promotion", promotion)
    summary = f"**{model_name} {promotion}**; champion: {f'v{champion}' if champion else 'none'}."
    client.set_tag(parent_run_id, MLFLOW_RUN_NOTE, flow_run_note(summary, rows))
    history = history_table(read_history(client, model_name))
    client.log_text(parent_run_id, f"# {model_name}: champion history\n\n{history}\n", "champion_history.md")
    client.set_terminated(parent_run_id)


def exported_model_uri(client: MlflowClient, run_id: str, precision: str) -> str:
    """The `models:/<id>` URI of run `run_id`'s export at `precision`."""
    name = "model" if precision == "fp32" else f"model-{precision}"
    experiment_id = client.get_run(run_id).info.experiment_id
    found = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list",
                                        filter_string=f"name = '{name}' AND source_run_id = '{run_id}'")
    if not found:
        raise VitflowError(f"run {run_id} has no {precision} export; add it to export.precisions in params.yaml "
                           "and run `vitflow run --force`")
    return f"models:/{found[0].model_id}"


def model_name_for(client: MlflowClient, registry: RegistryConfig, labels: list[str]) -> str:
    """The registered model a run with these `labels` registers to: `registry.model_name`, unless its versions
    predict another label set; then, by `registry.other_labels`, a model of its own named from the labels
    (`new_model`) or a VitflowError (`refuse`). Checked before any training."""
    name = registry.model_name
    try:
        versions = client.search_model_versions(f"name = '{name}'", max_results=50, order_by=["version_number DESC"])
    except MlflowException:
        versions = []
    champion = champion_version(client, name) if versions else None
    reference = champion or next(iter(versions), None)
    theirs = labels_of(reference) if reference is not None else None
    if theirs is None or theirs == labels:
        return name
    if registry.other_labels == "refuse":
        raise VitflowError(f"registry.model_name {name!r} predicts {theirs}, this data has {labels}; set "
                           "registry.model_name to another name, or registry.other_labels: new_model")
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(labels).lower()).strip("-")[:40]
    digest = hashlib.sha256(json.dumps(labels).encode()).hexdigest()[:6]
    return f"{name}-{slug}-{digest}"

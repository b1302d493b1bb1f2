"""The Markdown that describes runs and registered versions in MLflow's UI: run descriptions, model cards, the
champion history. Plain text from plain values; `vitflow.tracking` and `vitflow.registry` write it.
"""

from __future__ import annotations

import json

import pandas as pd

from vitflow.config import model_label
from vitflow.data.versioning import short_hash

# A strategy run's headline metrics, as logged: unprefixed, so they sort before every other (prefixed) name.
HEADLINE_METRICS = ("accuracy", "macro_f1", "best_epoch", "fit_seconds", "latency_ms")


def headline_table(metrics: dict[str, float]) -> str:
    """The headline metrics present in `metrics` as a one-row Markdown table."""
    row = {name: metrics[name] for name in HEADLINE_METRICS if name in metrics}
    return pd.DataFrame([row]).to_markdown(index=False, floatfmt=".4g") if row else ""


def _subject(strategy: str, tags: dict[str, str]) -> str:
    model = model_label(tags["model_source"]) if tags.get("model_source") else "?"
    return f"{strategy} fine-tune of {model} on data {short_hash(tags.get('data_version')) or '?'}"


def _scores(metrics: dict[str, float]) -> str:
    return ", ".join(f"{label} {metrics[name]:.4g}" for name, label in (("accuracy", "accuracy"),
                                                                         ("macro_f1", "macro-F1")) if name in metrics)


def strategy_run_note(strategy: str, tags: dict[str, str], metrics: dict[str, float], training: str,
                      registered: str | None = None) -> str:
    """A strategy run's description: what it fine-tunes on which data; once done, its test scores, the version it
    registered, its headline metrics and, for a training reused from an earlier run, that it was."""
    if not registered:
        return f"{_subject(strategy, tags)}: {training}…"
    reused = ("\n\nThe training was reused: an earlier run trained the same data, settings and code."
              if training == "reused" else "")
    return (f"{_subject(strategy, tags)}: {_scores(metrics)}; registered as {registered}.\n\n"
            f"{headline_table(metrics)}{reused}")


def model_card(model_name: str, version: int | str, tags: dict[str, str], run_id: str | None,
               metrics: dict[str, float], run_tags: dict[str, str]) -> str:
    """A registered version's description: a first line that reads well in a list of versions, its headline test
    metrics (from its run's `metrics`, else its own tags), data, code, the promotion decision and why, and how to
    load it."""
    uri = f"models:/{model_name}/{version}"
    scores = _scores(metrics) or f"accuracy {tags.get('test_accuracy', '?')}, macro-F1 {tags.get('test_macro_f1', '?')}"
    data = tags.get("data_version", "?")
    dirty = " (not committed in git)" if run_tags.get("data_dirty") == "true" else ""
    commit = run_tags.get("git_commit", "?")[:12]
    changed = " with uncommitted changes" if run_tags.get("git_dirty") == "true" else ""
    decision = tags.get("decision", "pending (decided once the flow run has compared its strategies)")
    why = f": {tags['decision_reason']}" if tags.get("decision_reason") else ""
    promoted = ""
    if "promoted_by" in tags:
        reason = tags.get("promotion_reason", "")
        promoted = (f"\n- **Promoted** by {tags['promoted_by']} at {tags['promoted_at']}"
                    f"{f': {reason}' if reason != tags.get('decision_reason') else ''}")
    return "\n".join([
        f"{_subject(tags.get('strategy', '?'), tags)}: {scores}.",
        "",
        headline_table(metrics),
        "",
        f"- **Classes**: {', '.join(_labels(tags))}; images {tags.get('image_size', '?')} px",
        f"- **Data**: version `{short_hash(data)}` (DVC hash `{data}`){dirty}",
        f"- **Code**: commit `{commit}`{changed}",
        f"- **Decision**: {decision}{why}{promoted}",
        f"- **Run**: `{run_id or '?'}`",
        "",
        "Load it:",
        "",
        f'```python\nimport mlflow\nmodel = mlflow.pyfunc.load_model("{uri}")\n```',
        "",
        f"```bash\nvitflow predict image.jpg --model {uri}\n```",
    ])


def _labels(tags: dict[str, str]) -> list[str]:
    return json.loads(tags["labels"]) if tags.get("labels") else ["?"]


def history_table(history: list[dict]) -> str:
    """The champion history (`vitflow.registry`'s entries, oldest first) as a Markdown table, newest first."""
    if not history:
        return "No champion yet."
    rows = []
    for entry in reversed(history):
        forced = f" (forced: {', '.join(entry['overrode'])})" if entry.get("overrode") else ""
        rows.append({"at (UTC)": entry["at"], "action": entry["action"], "champion": f"v{entry['version']}",
                     "previous": f"v{entry['previous']}" if entry["previous"] else "", "by": _cell(entry["actor"]),
                     "reason": _cell(entry["reason"] + forced)})
    return pd.DataFrame(rows).to_markdown(index=False)


def _cell(text: str) -> str:
    """`text` safe in a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def flow_run_note(decision: str, strategies: list[dict]) -> str:
    """A flow run's description: the promotion decision, then one row per strategy (its version and scores)."""
    return f"{decision}\n\n{pd.DataFrame(strategies).to_markdown(index=False, floatfmt='.4g')}"

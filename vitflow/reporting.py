"""Reports over the tracked runs: a comparison table of strategy runs, rendered as text, and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from vitflow.cards import HEADLINE_METRICS
from vitflow.config import model_label
from vitflow.data.versioning import short_hash
from vitflow.errors import VitflowError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

FORMATS = ("table", "csv", "md", "html")
RUN_PARAMS = ("epochs", "lr_backbone", "lr_head", "batch_size")  # under `train.`
# The comparison's metric columns, and the logged metric each shows.
RUN_METRICS = {**{name: name for name in HEADLINE_METRICS}, "trainable_params": "model/trainable_params"}
MARKERS = "osD^v<>pPX"  # one per model in the plot; each strategy has a colour


def compare_runs(client: MlflowClient, experiment_name: str, model_name: str,
                 parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per strategy run (nested run) of the experiment, oldest first, or of one flow run when
    `parent_run_id` is given: model, strategy, version (registered, when any), champion, the headline metrics and
    trainable params first, then data_version, key train params, duration_s, run_name, run_id and location (the run's
    page on a tracking server, or its artifact folder)."""
    from vitflow.tracking import run_location  # MLflow and torch: not for every command that imports this module

    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise VitflowError(f"experiment {experiment_name!r} not found; run `vitflow run` first or pass --experiment")
    versions = client.search_model_versions(f"name='{model_name}'")
    version_by_run = {version.tags.get("run_id") or version.run_id: int(version.version) for version in versions}
    champion = str(client.get_registered_model(model_name).aliases.get("champion", "")) if versions else None
    rows = []
    only = f"tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id else ""
    for run in _all_runs(client, experiment.experiment_id, only):
        if "mlflow.parentRunId" not in run.data.tags:
            continue
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        version = version_by_run.get(run.info.run_id) or _number(tags.get("model_version"))
        rows.append({"model": model_label(tags.get("model_source", "")), "strategy": tags.get("strategy", ""),
                     "version": version,
                     "champion": version is not None and str(version) == champion,
                     **{column: metrics.get(name) for column, name in RUN_METRICS.items()},
                     "data_version": short_hash(tags.get("data_version")),
                     **{name: _number(params.get(f"train.{name}")) for name in RUN_PARAMS},
                     "duration_s": (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None,
                     "run_name": run.info.run_name, "run_id": run.info.run_id, "location": run_location(run),
                     "start_time": run.info.start_time})
    columns = ["model", "strategy", "version", "champion", *RUN_METRICS, "data_version", *RUN_PARAMS, "duration_s",
               "run_name", "run_id", "location"]
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


def accuracy_vs_time_figure(frame: pd.DataFrame):
    """Scatter of test accuracy against training time from `compare_runs`, a colour per strategy and a marker per
    model, each point labelled with its registered version (or run name): a matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.add_subplot()
    strategies, models = sorted(frame["strategy"].unique()), sorted(frame["model"].unique())
    for (strategy, model), runs in frame.groupby(["strategy", "model"], sort=True):
        label = strategy if len(models) == 1 else f"{model} {strategy}"
        axes.scatter(runs["fit_seconds"], runs["accuracy"], color=f"C{strategies.index(strategy) % 10}",
                     marker=MARKERS[models.index(model) % len(MARKERS)], s=60, label=label)
        for _, run in runs.iterrows():
            label = f"v{run['version']}" if pd.notna(run["version"]) else run["run_name"]
            if run["champion"]:
                label += " (champion)"
            axes.annotate(label, (run["fit_seconds"], run["accuracy"]), xytext=(5, 4),
                          textcoords="offset points", fontsize=8)
    axes.set_xlabel("training time (s)")
    axes.set_ylabel("test accuracy")
    axes.set_title("Test accuracy vs training time, per strategy" + (" and model" if len(models) > 1 else ""))
    axes.grid(alpha=0.3)
    axes.legend(title="strategy" if len(models) == 1 else "model, strategy", fontsize=8)
    fig.tight_layout()
    return fig


def plot_accuracy_vs_time(frame: pd.DataFrame, path: Path | str) -> Path:
    """`accuracy_vs_time_figure` written as PNG to `path`."""
    path = Path(path)
    accuracy_vs_time_figure(frame).savefig(path, format="png", dpi=100)
    return path


def table_rows(frame: pd.DataFrame) -> list[dict]:
    """`frame` as JSON-ready rows: NaN and missing become null, numpy numbers plain ones."""
    return json.loads(frame.to_json(orient="records", date_format="iso"))


def artifact_rows(frame: pd.DataFrame) -> list[dict]:
    """`compare_runs` rows for a Prefect table artifact (which renders text cells as Markdown), scores to 4 decimals
    and times to 1: the headline columns, then `mlflow`, a link to the run's page (or, with a local store, its
    artifact folder), then the rest."""
    rounded = frame.round({"accuracy": 4, "macro_f1": 4, "fit_seconds": 1, "latency_ms": 1, "duration_s": 1})
    rows = []
    for row in table_rows(rounded):
        location = row.pop("location")
        link = f"[{row['run_name']}]({location})" if location.startswith(("http://", "https://")) else location
        headline = {key: row.pop(key) for key in ("model", "strategy", "version", "champion", *RUN_METRICS)}
        rows.append({**headline, "mlflow": link, **row})
    return rows

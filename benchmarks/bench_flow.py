"""Benchmark the default `retrain` flow and print tables for the README.

    uv run python -m benchmarks.bench_flow [--set KEY=VALUE ...]

Runs the flow twice in a fresh work directory and MLflow store (the project's own stay
untouched): a cold run, then a forced re-run on unchanged data that reuses the preprocessing
and training caches. Prints per-strategy results, the time per stage, and the machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

SCRATCH = Path(tempfile.mkdtemp(prefix="vitflow-bench-"))
os.environ["VITFLOW_WORK_DIR"] = str(SCRATCH / "work")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{SCRATCH / 'mlflow.db'}"

import pandas as pd  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402

from benchmarks.machine import machine  # noqa: E402
from flows.retrain import retrain  # noqa: E402


def stage_seconds(flow_run_id, result: dict) -> pd.Series:
    """Seconds per task (summed over branches) for one flow run, from Prefect's API. Task runs are named
    `<task>-<model>-<strategy>`, `<task>-<model>` or, by Prefect, `<task>-<3 hex digits>`."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    branches = {f"{item.model}-{item.strategy}" for item in result["registered"]}
    suffixes = sorted(branches | {item.model for item in result["registered"]}, key=len, reverse=True)

    def stage(name: str) -> str:
        for suffix in suffixes:
            if name.endswith(f"-{suffix}"):
                return name.removesuffix(f"-{suffix}")
        return name.rsplit("-", 1)[0]  # Prefect's own suffix

    # a branch's own task run runs the others: counting it would count them twice
    frame = pd.DataFrame([{"stage": stage(run.name), "seconds": run.total_run_time.total_seconds()}
                          for run in runs if run.name not in branches])
    return frame.groupby("stage", sort=False)["seconds"].sum()


def timed_run(overrides: list[str], force: bool) -> tuple[dict, pd.Series, float]:
    start = time.perf_counter()
    state = retrain(overrides=overrides, force=force, return_state=True)
    seconds = time.perf_counter() - start
    result = state.result()
    return result, stage_seconds(state.state_details.flow_run_id, result), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params.yaml override")
    args = parser.parse_args()

    cold, cold_stages, cold_seconds = timed_run(args.set, force=False)
    warm, warm_stages, warm_seconds = timed_run(args.set, force=True)

    rows = [{"strategy": item.strategy, "train_s": item.metrics["train_seconds"],
             "train_img/s": item.metrics["train_images_per_second"],
             "trainable_params": int(item.metrics["trainable_params"]),
             "test_accuracy": item.metrics["test_accuracy"], "test_macro_f1": item.metrics["test_macro_f1"],
             "latency_ms/img": item.metrics["latency_ms_per_image"], "peak_rss_mb": item.metrics["peak_rss_mb"]}
            for item in cold["registered"]]
    strategies = pd.DataFrame(rows).set_index("strategy")
    stages = pd.DataFrame({"cold run (s)": cold_stages, "re-run (s)": warm_stages}).fillna(0.0)

    print(f"machine: {machine()}")
    print(f"flow wall time: cold {cold_seconds:.0f} s, re-run on unchanged data {warm_seconds:.0f} s; "
          f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    print("\nper strategy (cold run):")
    print(strategies.to_markdown(floatfmt=".4g"))
    print("\ntime per stage (seconds, summed over strategies):")
    print(stages.to_markdown(floatfmt=".2f"))
    if {"full", "feature_extraction"} <= set(strategies.index):
        ratio = strategies.loc["full", "train_s"] / strategies.loc["feature_extraction", "train_s"]
        print(f"\nfeature_extraction trains {ratio:.1f}x faster than full")
    if "preprocess" in stages.index and stages.loc["preprocess", "re-run (s)"] > 0:
        ratio = stages.loc["preprocess", "cold run (s)"] / stages.loc["preprocess", "re-run (s)"]
        print(f"re-run preprocessing is {ratio:.0f}x faster (cache hit)")
    print(f"challenger v{cold['decision'].challenger}: {cold['decision'].reason}")


if __name__ == "__main__":
    main()

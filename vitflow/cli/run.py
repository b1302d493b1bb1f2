"""`vitflow run`: check everything, then run the retrain flow and print its comparison table."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vitflow.errors import VitflowError
from vitflow.paths import PARAMS_FILE


def add_commands(commands) -> None:
    run = commands.add_parser("run", help="run the retrain flow: version data, fine-tune, evaluate, register")
    run.add_argument("--params", default=str(PARAMS_FILE), help="config file (default: the project's params.yaml)")
    run.add_argument("--data", help="image folder: <split>/<class>/* or <class>/* (overrides data.path)")
    run.add_argument("--model", help="HF id or directory, or timm name or directory (overrides model.source); "
                     "several, comma-separated, train each under every strategy")
    run.add_argument("--strategies", help="comma-separated, e.g. full,partial,feature_extraction")
    run.add_argument("--epochs", type=int, help="overrides train.epochs")
    run.add_argument("--batch-size", type=int, help="overrides train.batch_size")
    run.add_argument("--task-runner", choices=["threads", "dask"], default="threads",
                     help="where the strategies run: threads in this process, or Dask workers")
    run.add_argument("--workers", type=int, default=1,
                     help="strategies run at once (threads, or local Dask worker processes); default 1")
    run.add_argument("--dask-address", help="a Dask scheduler (tcp://HOST:PORT) to spread strategies over machines")
    run.add_argument("--force", action="store_true", help="retrain even when data, params and code are unchanged")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any params.yaml setting, e.g. --set train.lr_head=5e-4 (repeatable)")
    run.set_defaults(handler=run_command)


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The --flags of `vitflow run` as params.yaml overrides; paths become absolute (relative to the cwd)."""
    overrides = []
    if args.data:
        overrides.append(f"data.path={Path(args.data).resolve()}")
    if args.model:
        sources = [str(Path(source).resolve()) if Path(source).exists() else source for source in args.model.split(",")]
        overrides.append(f"model.source={sources[0] if len(sources) == 1 else sources}")
    if args.strategies:
        overrides.append(f"train.strategies=[{args.strategies}]")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    return overrides + args.set


class _QuietConsole(logging.Filter):
    """Bad input is reported once, in one line, by `main`: drop Prefect's traceback for it. Prefect's notes that it
    starts and stops a temporary server, with advice to run one, say nothing a run's user needs (`vitflow ui` shows
    the runs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], VitflowError):
            record.exc_info = None
        return not record.getMessage().startswith(("Starting temporary server", "Stopping temporary server"))


def run_command(args: argparse.Namespace) -> int:
    from vitflow.preflight import plan_run

    params_file, overrides = str(Path(args.params).resolve()), run_overrides(args)
    if args.workers < 1:
        raise VitflowError(f"--workers {args.workers}: must be at least 1")
    plan_run(params_file, overrides)  # bad input fails here, before Prefect starts

    import pandas as pd

    from flows.retrain import retrain, task_runner
    from vitflow.cli.ui import MLFLOW_PORT
    from vitflow.tracking import experiment_page, server_url

    loggers = [logging.root, *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                               if name.startswith("prefect"))]  # the console handler is the root logger's
    for handler in {handler for logger in loggers for handler in logger.handlers}:
        handler.addFilter(_QuietConsole())

    runner = task_runner("dask" if args.dask_address else args.task_runner, args.workers, args.dask_address)
    summary = retrain.with_options(task_runner=runner)(overrides=overrides, params_file=params_file, force=args.force)
    if summary["nothing_to_do"]:
        print(f"nothing to do: data, params and code match finished run {summary['same_as_run']} "
              f"(recorded as run {summary['parent_run_id']}); pass --force to retrain anyway")
        return 0
    rows = [{"model": item.model, "strategy": item.strategy, "version": item.version,
             "accuracy": item.metrics["test_accuracy"],
             "macro_f1": item.metrics["test_macro_f1"], "best_epoch": int(item.metrics["best_epoch"]),
             "fit_s": item.metrics["train_seconds"], "latency_ms": item.metrics["latency_ms_per_image"],
             "trainable_params": int(item.metrics["trainable_params"]),
             "train_img/s": item.metrics["train_images_per_second"], "run_id": item.run_id}
            for item in summary["registered"]]
    decision = summary["decision"]
    print()
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda value: f"{value:.4g}"))
    print()
    outcome = "promoted to champion" if decision.promoted else "not promoted"
    print(f"challenger: {summary['model_name']} v{decision.challenger}, {outcome} ({decision.reason})")
    print(f"data version: {summary['data_version']}; images skipped: {summary['skipped_images']} (see the manifest)")
    print(f"parent run: {summary['parent_run_id']} (experiment {summary['experiment_id']})")
    if url := server_url():
        print(f"compare the runs: {experiment_page(url, summary['experiment_id'])}")
    else:
        page = experiment_page(f"http://127.0.0.1:{MLFLOW_PORT}", summary["experiment_id"])
        print(f"compare the runs: uv run vitflow ui, then open {page}")
    return 0

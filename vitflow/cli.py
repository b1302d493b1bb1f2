"""The `vitflow` command line.

    vitflow run [--data DIR] [--model SOURCE] [--strategies full,partial] [--epochs N] [--set KEY=VALUE ...]
    vitflow predict IMAGE... [--model URI_OR_DIR] [--top-k 5] [--precision fp32|fp16|bf16|int8]
    vitflow explain IMAGE [--model URI_OR_DIR] [--head-fusion mean|max|min] [--discard RATIO] [--class LABEL]
    vitflow models | promote | rollback | compare      (vitflow/cli_registry.py)
    vitflow serve --cron "0 3 * * 1" [--timezone TZ]  (vitflow/cli_ops.py)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vitflow.cli_ops import add_ops_commands
from vitflow.cli_registry import add_registry_commands
from vitflow.config import PARAMS_FILE
from vitflow.errors import VitflowError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except VitflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitflow", description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the retrain flow: version data, fine-tune, evaluate, register")
    run.add_argument("--params", default=str(PARAMS_FILE), help="config file (default: the project's params.yaml)")
    run.add_argument("--data", help="image folder: <split>/<class>/* or <class>/* (overrides data.path)")
    run.add_argument("--model", help="HF id or directory, or timm name or directory (overrides model.source)")
    run.add_argument("--strategies", help="comma-separated: full,partial,feature_extraction")
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

    predict = commands.add_parser("predict", help="top-k labels for images, from the champion by default")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--model", help="MLflow model URI (models:/NAME@ALIAS, runs:/...) or a checkpoint directory")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8"], default="fp32",
                         help="run the model's export at this precision (default: fp32)")
    predict.add_argument("--params", default=str(PARAMS_FILE), help=argparse.SUPPRESS)
    predict.set_defaults(handler=predict_command)

    explain = commands.add_parser("explain", help="attention-rollout heatmap over one image")
    explain.add_argument("image", help="image file")
    explain.add_argument("--model", help="MLflow model URI or checkpoint directory (default: the champion)")
    explain.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean")
    explain.add_argument("--discard", type=float, default=0.0, metavar="RATIO",
                         help="drop this fraction of the weakest attention per layer")
    explain.add_argument("--class", dest="class_label", metavar="LABEL",
                         help="class-specific gradient rollout for LABEL")
    explain.add_argument("--out", help="output PNG (default: <image name>.rollout.png in the current directory)")
    explain.add_argument("--params", default=str(PARAMS_FILE), help=argparse.SUPPRESS)
    explain.set_defaults(handler=explain_command)

    add_registry_commands(commands)
    add_ops_commands(commands)
    return parser


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The --flags of `vitflow run` as params.yaml overrides; paths become absolute (relative to the cwd)."""
    overrides = []
    if args.data:
        overrides.append(f"data.path={Path(args.data).resolve()}")
    if args.model:
        overrides.append(f"model.source={Path(args.model).resolve() if Path(args.model).exists() else args.model}")
    if args.strategies:
        overrides.append(f"train.strategies=[{args.strategies}]")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    return overrides + args.set


class _HideUserErrorTracebacks(logging.Filter):
    """Bad input is reported once, in one line, by `main`: drop Prefect's traceback for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], VitflowError):
            record.exc_info = None
        return True


def run_command(args: argparse.Namespace) -> int:
    import pandas as pd

    from flows.retrain import retrain, task_runner
    from vitflow.tracking import tracking_uri

    prefect_loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                       if name.startswith("prefect")]
    for handler in {handler for logger in prefect_loggers for handler in logger.handlers}:
        handler.addFilter(_HideUserErrorTracebacks())

    runner = task_runner("dask" if args.dask_address else args.task_runner, args.workers, args.dask_address)
    summary = retrain.with_options(task_runner=runner)(
        overrides=run_overrides(args), params_file=str(Path(args.params).resolve()), force=args.force)
    if summary["nothing_to_do"]:
        print(f"nothing to do: data, params and code match finished run {summary['same_as_run']} "
              f"(recorded as run {summary['parent_run_id']}); pass --force to retrain anyway")
        return 0
    rows = [{"strategy": item.strategy, "version": item.version,
             "trainable_params": int(item.metrics["trainable_params"]),
             "train_s": item.metrics["train_seconds"], "train_img/s": item.metrics["train_images_per_second"],
             "test_accuracy": item.metrics["test_accuracy"], "test_macro_f1": item.metrics["test_macro_f1"],
             "latency_ms": item.metrics["latency_ms_per_image"], "run_id": item.run_id}
            for item in summary["registered"]]
    decision = summary["decision"]
    print()
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda value: f"{value:.4g}"))
    print()
    outcome = "promoted to champion" if decision.promoted else "not promoted"
    print(f"challenger: {summary['model_name']} v{decision.challenger}, {outcome} ({decision.reason})")
    print(f"data version: {summary['data_version']}; images skipped: {summary['skipped_images']} (see the manifest)")
    print(f"parent run: {summary['parent_run_id']} (experiment {summary['experiment_id']})")
    uri = tracking_uri()
    if uri.startswith("sqlite:"):
        print(f"compare the runs: uv run mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)")
    else:
        print(f"compare the runs on the tracking server: {uri}")
    return 0


def resolve_model(model: str | None, params_file: str):
    """A checkpoint directory, an MLflow model URI, or (None) the registered champion, as an ImageClassifier."""
    from vitflow.models import load_model
    from vitflow.serving import load_logged_model

    if model and Path(model).is_dir():
        return load_model(model).eval()
    return _load_logged(model, params_file, lambda client, uri: load_logged_model(uri).eval())


def resolve_runner(model: str | None, precision: str, params_file: str):
    """Like `resolve_model`, but the model's export at `precision`, as a `vitflow.precision.ExportedModel`."""
    from vitflow.precision import load_exported

    if model and Path(model).is_dir():
        runner = load_exported(model)
        if runner.precision != precision:
            raise VitflowError(f"{model}: holds a {runner.precision} model, not {precision}; pass --precision "
                               f"{runner.precision}, or a registered model URI to pick one of its exports")
        return runner
    from mlflow.models import get_model_info

    from tasks.register import exported_model_uri
    from vitflow.serving import load_logged_runner

    def load(client, uri: str):
        if precision != "fp32":
            uri = exported_model_uri(client, get_model_info(uri).run_id, precision)
        return load_logged_runner(uri)

    return _load_logged(model, params_file, load)


def _load_logged(model_uri: str | None, params_file: str, load):
    """`load(client, uri)` on an MLflow model URI, or (None) the registered champion; a failure becomes one line."""
    from vitflow.config import load_params
    from vitflow.tracking import configure_mlflow

    client = configure_mlflow()
    uri = model_uri or f"models:/{load_params(params_file)['registry']['model_name']}@champion"
    try:
        return load(client, uri)
    except VitflowError:
        raise
    except Exception as error:  # MLflow raises several types for a missing model or alias
        raise VitflowError(f"model {uri}: cannot load it ({str(error).splitlines()[0]}); "
                           "run `vitflow run` first or pass --model") from None


def predict_command(args: argparse.Namespace) -> int:
    from vitflow.images import load_image, normalize

    missing = [image for image in args.images if not Path(image).is_file()]
    if missing:
        raise VitflowError(f"{missing[0]}: no such image file")
    model = resolve_runner(args.model, args.precision, args.params)
    for image_path in args.images:
        pixels = load_image(image_path, model.data_config)
        probabilities = model(normalize(pixels[None], model.data_config)).softmax(1)[0]
        top = probabilities.topk(min(args.top_k, len(model.labels)))
        print(image_path)
        for score, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            print(f"  {model.labels[index]:<24} {score:.4f}")
    return 0


def explain_command(args: argparse.Namespace) -> int:
    from tasks.rollout import explain_image

    if not Path(args.image).is_file():
        raise VitflowError(f"{args.image}: no such image file")
    model = resolve_model(args.model, args.params)
    out = args.out or f"{Path(args.image).stem}.rollout.png"
    result = explain_image(model, args.image, out, args.head_fusion, args.discard, args.class_label)
    target = f" for class {result['class']}" if result["class"] else ""
    print(f"predicted {result['predicted']} (p={result['probability']:.3f}); "
          f"rollout{target} written to {result['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

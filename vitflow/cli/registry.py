"""The registry commands of the `vitflow` command line.

    vitflow models [--name NAME]
    vitflow promote VERSION [--reason TEXT] [--force] | vitflow promote --best [--reason TEXT]
    vitflow rollback [--reason TEXT]
    vitflow compare [--experiment NAME] [--format table|csv|md|html] [--plot PATH]

The model name and experiment default to params.yaml's `registry.model_name` and `mlflow.experiment`.
"""

from __future__ import annotations

import argparse
import sys

from vitflow.config import load_config
from vitflow.errors import VitflowError
from vitflow.paths import PARAMS_FILE
from vitflow.reporting import FORMATS


def add_commands(commands) -> None:
    """Add models, promote, rollback and compare to the `add_subparsers()` object `commands`."""
    models = commands.add_parser("models", help="list the registered versions; the champion is marked")
    _add_common(models)
    models.set_defaults(handler=models_command)

    promote = commands.add_parser("promote", help="move the champion alias to a version, recording who and why")
    which = promote.add_mutually_exclusive_group(required=True)
    which.add_argument("version", nargs="?", help="the version number to promote")
    which.add_argument("--best", action="store_true",
                       help="the version with the best test metric (registry.metric) on the champion's data version")
    promote.add_argument("--reason", help="why, kept in the champion history")
    promote.add_argument("--force", action="store_true",
                         help="promote even if evaluated on another data version or predicting another label set")
    _add_common(promote)
    promote.set_defaults(handler=promote_command)

    rollback = commands.add_parser("rollback", help="give the champion alias back to the previous champion")
    rollback.add_argument("--reason", default="rollback", help="why, kept in the champion history")
    rollback.add_argument("--force", action="store_true", help="roll back even to a version with another label set")
    _add_common(rollback)
    rollback.set_defaults(handler=rollback_command)

    compare = commands.add_parser("compare", help="compare the strategy runs: table and accuracy-vs-time plot")
    compare.add_argument("--experiment", help="MLflow experiment (default: mlflow.experiment)")
    compare.add_argument("--format", choices=FORMATS, default="table")
    compare.add_argument("--plot", default="compare.png", help="PNG to write (default: compare.png)")
    _add_common(compare)
    compare.set_defaults(handler=compare_command)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="registered model (default: registry.model_name)")
    parser.add_argument("--params", default=str(PARAMS_FILE), help=argparse.SUPPRESS)


def _setup(args: argparse.Namespace):
    """(MLflow client, config, model name) for a registry command."""
    from vitflow.tracking import configure_mlflow

    config = load_config(args.params)
    return configure_mlflow(), config, args.name or config.registry.model_name


def _describe(model_name: str, entry: dict) -> str:
    """One line for a champion move (a history entry)."""
    previous = f"v{entry['previous']}" if entry["previous"] else "none"
    moved = {"promote": "promoted", "rollback": "rolled back"}[entry["action"]]
    return (f"champion of {model_name}: v{entry['version']} (was {previous}), {moved} by {entry['actor']} "
            f"at {entry['at']}: {entry['reason']}")


def models_command(args: argparse.Namespace) -> int:
    from vitflow.registry import CHAMPION, list_versions

    client, _, model_name = _setup(args)
    frame = list_versions(client, model_name)
    if frame.empty:
        print(f"{model_name} has no versions yet; run `vitflow run`")
        return 0
    is_champion = frame["aliases"].str.split(",").apply(lambda aliases: CHAMPION in aliases)
    frame.insert(0, "", is_champion.map({True: "*", False: ""}))
    frame["created"] = frame["created"].dt.strftime("%Y-%m-%d %H:%M")
    print(frame.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    print("(* marks the champion)" if is_champion.any() else f"{model_name} has no champion yet; see `vitflow promote`")
    return 0


def promote_command(args: argparse.Namespace) -> int:
    from vitflow.registry import best_version, champion_number, promote_version
    from vitflow.tracking import current_user

    client, config, model_name = _setup(args)
    version, reason = args.version, args.reason
    if args.best:
        key = f"test_{config.registry.metric}"
        best = best_version(client, model_name, config.registry.metric)
        version = str(best.version)
        if champion_number(client, model_name) == version:
            print(f"v{version} ({key} {best.tags[key]}) is already the champion of {model_name}; nothing to do")
            return 0
        reason = reason or f"best {key} ({best.tags[key]}) on its data version"
    entry = promote_version(client, model_name, version, reason or "promoted by hand", current_user(),
                            force=args.force)
    print(_describe(model_name, entry))
    return 0


def rollback_command(args: argparse.Namespace) -> int:
    from vitflow.registry import rollback
    from vitflow.tracking import current_user

    client, _, model_name = _setup(args)
    print(_describe(model_name, rollback(client, model_name, current_user(), args.reason, force=args.force)))
    return 0


def compare_command(args: argparse.Namespace) -> int:
    from vitflow.reporting import compare_runs, plot_accuracy_vs_time, render

    client, config, model_name = _setup(args)
    experiment = args.experiment or config.mlflow.experiment
    frame = compare_runs(client, experiment, model_name)
    if frame.empty:
        raise VitflowError(f"experiment {experiment!r} has no strategy runs yet; run `vitflow run` first")
    print(render(frame, args.format))
    print(f"plot written to {plot_accuracy_vs_time(frame, args.plot)}", file=sys.stderr)  # stdout: the table only
    return 0

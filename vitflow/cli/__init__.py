"""The `vitflow` command line: the top of the stack, and the only part of the package that imports
`flows/` or `tasks/`.

    vitflow run [--data DIR] [--model SOURCE] [--strategies full,partial] [--epochs N] [--set KEY=VALUE ...]
    vitflow predict FILE|FOLDER|'GLOB'... [--model URI_OR_DIR] [--top-k 5] [--batch-size 32]
                    [--output preds.csv|preds.jsonl] [--precision fp32|fp16|bf16|int8]
    vitflow explain IMAGE [--model URI_OR_DIR] [--method gradient|plain] [--class LABEL]
                    [--head-fusion mean|max|min] [--discard RATIO] [--out FILE.png]
    vitflow models | promote | rollback | compare
    vitflow serve --cron "0 3 * * 1" [--timezone TZ]
    vitflow ui [--mlflow-port 5000] [--prefect-port 4200]

Every command checks its input before starting anything slow; an error is one line on stderr and
exits with the code of its kind (2: bad input or setting, 3: a server that did not answer).
"""

from __future__ import annotations

import argparse
import sys

from vitflow import environment
from vitflow.cli import ops, predict, registry, run, ui
from vitflow.errors import VitflowError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    environment.set_up()
    try:
        return args.handler(args)
    except VitflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitflow", description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for module in (run, predict, registry, ops, ui):
        module.add_commands(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())

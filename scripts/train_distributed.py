"""Fine-tune one strategy on several GPUs (or CPU processes): launch it with Accelerate.

    uv run accelerate launch --multi_gpu --num_processes 4 scripts/train_distributed.py --cache .vitflow/cache/<key> \\
        --model models/foundation --strategy full --out runs/full [--set train.epochs=5]

(`--multi_gpu` starts the processes, on GPUs or, on a machine without, on the CPU; `accelerate config` sets up
several machines or FSDP.)
Every process loads params.yaml, the model and the preprocessed cache (`vitflow run` or the `preprocess` task
writes it); DDP deals each process its share of the batches, and the main process saves `OUT/model` and
`OUT/result.json` and prints the result. `train.batch_size` is per process: a step sees batch_size x processes.
"""

import argparse
import json
import sys
from dataclasses import asdict

from accelerate import PartialState

from vitflow.config import load_config
from vitflow.data.cache import load_labels
from vitflow.devices import resolve_device
from vitflow.errors import VitflowError
from vitflow.paths import PARAMS_FILE
from vitflow.training.loop import train_from_cache
from vitflow.training.strategies import STRATEGIES, resolve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="a preprocessed cache directory (vitflow.data.cache)")
    parser.add_argument("--model", help="model source; default: model.source in params.yaml")
    parser.add_argument("--strategy", required=True, choices=list(STRATEGIES))
    parser.add_argument("--out", required=True, help="directory for model/ and result.json")
    parser.add_argument("--params", default=PARAMS_FILE, help="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.params, args.overrides)
        model = config.model.model_copy(update={"source": args.model}) if args.model else config.model
        on_cpu = resolve_device(config.train.device).type == "cpu"  # Accelerate's multi-CPU mode needs saying so
        main_process = PartialState(cpu=on_cpu).is_main_process
        result = train_from_cache(model, load_labels(args.cache), config.preprocess.image_size, args.cache,
                                  resolve(config.train, args.strategy), args.out, progress=main_process)
    except VitflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    if main_process:
        print(json.dumps(asdict(result), indent=2))
    PartialState().destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tune one strategy on several GPUs (or CPU processes) with torch distributed: launch it with torchrun.

    uv run torchrun --nproc_per_node 4 scripts/train_distributed.py --cache .vitflow/cache/<key> \\
        --model models/foundation --strategy full --out runs/full [--set train.epochs=5]

Every rank loads params.yaml, the model and the preprocessed cache (`vitflow run` or the `preprocess` task
writes it); `fine_tune` deals each rank its share of the batches, and rank 0 saves `OUT/model` and
`OUT/result.json` and prints the result. `train.batch_size` is per rank: a step sees batch_size x ranks images.
"""

import argparse
import json
import sys
from dataclasses import asdict

from vitflow.config import load_config
from vitflow.data.cache import load_labels
from vitflow.errors import VitflowError
from vitflow.paths import PARAMS_FILE
from vitflow.training import distributed
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
        result = train_from_cache(model, load_labels(args.cache), config.preprocess.image_size, args.cache,
                                  resolve(config.train, args.strategy), args.out, progress=distributed.is_main())
    except VitflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        distributed.teardown()
    if distributed.is_main():
        print(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

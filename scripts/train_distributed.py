"""Fine-tune one strategy on several GPUs (or CPU processes) with torch distributed: launch it with torchrun.

    uv run torchrun --nproc_per_node 4 scripts/train_distributed.py --cache .vitflow/cache/<key>.safetensors \\
        --model models/foundation --strategy full --out runs/full [--set train.epochs=5]

Every rank loads params.yaml, the model and the preprocessed cache (`vitflow run` or the `preprocess` task
writes it); `fine_tune` deals each rank its share of the batches, and rank 0 saves `OUT/model` and
`OUT/result.json` and prints the result. `train.batch_size` is per rank: a step sees batch_size x ranks images.
"""

import argparse
import json
import sys
from dataclasses import asdict

import torch
from safetensors import safe_open

from tasks import distributed
from tasks.preprocess import load_split
from tasks.train import STRATEGIES, TrainSettings, fine_tune
from vitflow.config import PARAMS_FILE, load_params
from vitflow.errors import VitflowError
from vitflow.models import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="preprocessed .safetensors file (labels in its metadata)")
    parser.add_argument("--model", help="model source; default: model.source in params.yaml")
    parser.add_argument("--strategy", required=True, choices=STRATEGIES)
    parser.add_argument("--out", required=True, help="directory for model/ and result.json")
    parser.add_argument("--params", default=PARAMS_FILE, help="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
        settings = TrainSettings.from_params(params)
        with safe_open(args.cache, framework="pt") as handle:
            labels = json.loads(handle.metadata()["labels"])
        torch.manual_seed(settings.seed)  # the new head's initialisation, as fine_tune_task seeds it
        model = load_model(args.model or params["model"]["source"], labels, params["preprocess"]["image_size"],
                           params["model"]["trust_remote_code"])
        result = fine_tune(model, load_split(args.cache, "train"), load_split(args.cache, "val"), args.strategy,
                           settings, args.out, progress=distributed.is_main())
    except VitflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
    if distributed.is_main():
        print(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

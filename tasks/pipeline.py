"""The DVC pipeline's stages: the task functions the Prefect flow chains, one stage per process, no Prefect or MLflow.

    python -m tasks.pipeline prepare
    python -m tasks.pipeline train --strategy full
    python -m tasks.pipeline evaluate --strategy full
    python -m tasks.pipeline export --strategy full

`dvc.yaml` runs them (`dvc repro`, `dvc exp run --set-param train.epochs=5`). Paths, those in params.yaml
included, are relative to the working directory: DVC runs every stage from the repository root.
Everything is written under `pipeline/`:

    prepared/        manifest.csv, data.safetensors (every split preprocessed for the model, labels in its metadata)
    models/S/        the fine-tuned model (model/) and result.json
    evaluation/S/    evaluate_model's report files
    exports/S/       one directory per precision
    metrics/         train-S.json, eval-S.json, export-S.json
    plots/           train/S.csv (learning curve), predictions-S.csv (actual, predicted per test image)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitflow.config import load_params
from vitflow.errors import VitflowError

# Each stage imports only the task module it calls: torch, transformers, Prefect, MLflow and scikit-learn
# take seconds each to import, and every stage is a process of its own.
PIPELINE = Path("pipeline")
PREPARED = PIPELINE / "prepared"
CACHE_FILE = PREPARED / "data.safetensors"
METRICS = PIPELINE / "metrics"
PLOTS = PIPELINE / "plots"


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def model_root(strategy: str) -> Path:
    """Where `train` saves a strategy's model (model/) and result.json."""
    return PIPELINE / "models" / strategy


def prepare(params: dict) -> None:
    """In: params (data.*, model.*, preprocess.image_size). Out: pipeline/prepared/ (manifest, tensors)."""
    from tasks.data import build_manifest, class_labels
    from tasks.preprocess import preprocess_dataset
    from vitflow.models import load_model

    data, model = params["data"], params["model"]
    manifest = build_manifest(data["path"], data["val_fraction"], data["test_fraction"], data["seed"])
    PREPARED.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(PREPARED / "manifest.csv", index=False)
    labels = class_labels(manifest)
    data_config = load_model(model["source"], labels, params["preprocess"]["image_size"],
                             model["trust_remote_code"]).data_config
    preprocess_dataset(manifest, data["path"], data_config, labels, CACHE_FILE, progress=False)


def train(params: dict, strategy: str) -> None:
    """In: params (model.*, preprocess.*, train.*) and pipeline/prepared/. Out: the model, its metrics and curve."""
    import pandas as pd

    from tasks.preprocess import load_labels
    from tasks.train import TrainSettings, train_from_cache

    result = train_from_cache(params["model"]["source"], load_labels(CACHE_FILE), params["preprocess"]["image_size"],
                              CACHE_FILE, strategy, TrainSettings.from_params(params), model_root(strategy),
                              params["model"]["trust_remote_code"], progress=False)
    write_json(METRICS / f"train-{strategy}.json",
               {"train_seconds": result.train_seconds, "trainable_params": result.trainable_params,
                "total_params": result.total_params, "val_accuracy": result.history[-1]["val_accuracy"],
                "val_loss": result.history[-1]["val_loss"]})
    curve = PLOTS / "train" / f"{strategy}.csv"
    curve.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(result.history).to_csv(curve, index=False)


def evaluate(params: dict, strategy: str) -> None:
    """In: params (evaluate.batch_size), the trained model and the test split. Out: report, metrics, predictions."""
    import pandas as pd

    from tasks.evaluate import evaluate_model
    from tasks.preprocess import load_split
    from tasks.train import RESULT_FILE
    from vitflow.models import load_model

    model = load_model(str(model_root(strategy) / "model"))
    test = load_split(CACHE_FILE, "test")
    history = json.loads((model_root(strategy) / RESULT_FILE).read_text())["history"]
    result = evaluate_model(model, test, PIPELINE / "evaluation" / strategy, params["evaluate"]["batch_size"], history)
    write_json(METRICS / f"eval-{strategy}.json", result.metrics)
    predictions = pd.DataFrame({"path": test.paths, "actual": [model.labels[i] for i in test.labels.tolist()],
                                "predicted": [model.labels[i] for i in result.predicted]})
    predictions.to_csv(PLOTS / f"predictions-{strategy}.csv", index=False)


def export(params: dict, strategy: str) -> None:
    """In: params (export.precisions, evaluate.batch_size) and the trained model. Out: exports and their records."""
    from tasks.export import export_and_verify

    records = export_and_verify(model_root(strategy) / "model", CACHE_FILE, PIPELINE / "exports" / strategy,
                                params["export"]["precisions"], params["evaluate"]["batch_size"])
    write_json(METRICS / f"export-{strategy}.json",
               {record["precision"]: {key: value for key, value in record.items() if key not in ("precision", "path")}
                for record in records})


def main(argv: list[str] | None = None) -> int:
    """Run one stage with params.yaml; prints a one-line error and returns 1 on bad input or data."""
    parser = argparse.ArgumentParser(prog="python -m tasks.pipeline", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="the config file (default: params.yaml)")
    stages = parser.add_subparsers(dest="stage", required=True)
    stages.add_parser("prepare", help="manifest and preprocessed tensors")
    for name in ("train", "evaluate", "export"):
        stages.add_parser(name, help=f"{name} one strategy").add_argument("--strategy", required=True)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        if args.stage == "prepare":
            prepare(params)
        else:
            {"train": train, "evaluate": evaluate, "export": export}[args.stage](params, args.strategy)
    except VitflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The DVC pipeline's stages: one small entry point over the same library calls the Prefect tasks make.

    python -m vitflow.stages foundation
    python -m vitflow.stages prepare
    python -m vitflow.stages train --strategy full
    python -m vitflow.stages evaluate --strategy full
    python -m vitflow.stages export --strategy full

`dvc.yaml` runs them (`dvc repro`, `dvc exp run --set-param train.epochs=5`). Paths in params.yaml are
relative to the project; everything but the foundation checkpoint is written under `pipeline/`:

    prepared/        manifest.csv, cache/ (every split preprocessed for the model: vitflow.data.cache)
    models/S/        the fine-tuned model (model/) and result.json
    evaluation/S/    evaluate_model's report files
    exports/S/       one directory per precision
    metrics/         train-S.json, eval-S.json, export-S.json
    plots/           train/S.csv (learning curve), predictions-S.csv (actual, predicted per test image)

No Prefect and no MLflow here: each stage is a process of its own and imports only what it calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitflow.config import Config, load_config
from vitflow.errors import VitflowError
from vitflow.paths import PARAMS_FILE, PROJECT_ROOT, project_path

PIPELINE = Path("pipeline")
PREPARED = PIPELINE / "prepared"
CACHE_DIR = PREPARED / "cache"
METRICS = PIPELINE / "metrics"
PLOTS = PIPELINE / "plots"
FOUNDATION_METRICS = PROJECT_ROOT / "metrics" / "foundation.json"


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def model_root(strategy: str) -> Path:
    """Where `train` saves a strategy's model (model/) and result.json."""
    return PIPELINE / "models" / strategy


def foundation(config: Config) -> None:
    """In: foundation.*. Out: the DINOv2-small checkpoint, checked against onnxruntime, and its metrics."""
    from vitflow.models.foundation import PACKAGE, build_foundation_checkpoint, verify_against_onnx

    output = project_path(config.foundation.output)
    build_foundation_checkpoint(output)
    result = verify_against_onnx(output, tolerance=config.foundation.tolerance)
    write_json(FOUNDATION_METRICS, result)
    print(f"foundation: {config.foundation.output} (DINOv2 ViT-S/14 from {PACKAGE}) matches onnxruntime: max |diff| "
          f"{result['max_abs_diff']:.2e} <= {config.foundation.tolerance:g} on input {result['input_shape']}")


def prepare(config: Config) -> None:
    """In: data.*, model.*, preprocess.*. Out: pipeline/prepared/ (manifest, preprocessed tensors)."""
    from vitflow.data.cache import preprocess_dataset
    from vitflow.data.manifest import build_manifest, class_labels, write_manifest
    from vitflow.models import load_pretrained

    data, model = config.data, config.model
    manifest = build_manifest(project_path(data.path), data.val_fraction, data.test_fraction, data.seed,
                              data.label_names, data.duplicates)
    write_manifest(manifest, PREPARED / "manifest.csv")
    labels = class_labels(manifest)
    data_config = load_pretrained(model, labels, config.preprocess.image_size).data_config
    preprocess_dataset(manifest, project_path(data.path), data_config, labels, CACHE_DIR, data.workers,
                       progress=False)


def train(config: Config, strategy: str) -> None:
    """In: model.*, preprocess.*, train.* and pipeline/prepared/. Out: the model, its metrics and learning curve."""
    import pandas as pd

    from vitflow.data.cache import load_labels
    from vitflow.training.loop import train_from_cache
    from vitflow.training.strategies import resolve

    result = train_from_cache(config.model, load_labels(CACHE_DIR), config.preprocess.image_size, CACHE_DIR,
                              resolve(config.train, strategy), model_root(strategy), progress=False)
    write_json(METRICS / f"train-{strategy}.json",
               {"train_seconds": result.train_seconds, "trainable_params": result.trainable_params,
                "total_params": result.total_params, "val_accuracy": result.history[-1]["val_accuracy"],
                "val_loss": result.history[-1]["val_loss"]})
    curve = PLOTS / "train" / f"{strategy}.csv"
    curve.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(result.history).to_csv(curve, index=False)


def evaluate(config: Config, strategy: str) -> None:
    """In: evaluate.batch_size, the trained model and the test split. Out: report, metrics, predictions."""
    import pandas as pd

    from vitflow.data.cache import load_split
    from vitflow.devices import resolve_device
    from vitflow.evaluation import evaluate_model
    from vitflow.models import load_model
    from vitflow.training.loop import RESULT_FILE

    model = load_model(str(model_root(strategy) / "model")).to(resolve_device(config.train.device))
    test = load_split(CACHE_DIR, "test")
    history = json.loads((model_root(strategy) / RESULT_FILE).read_text())["history"]
    result = evaluate_model(model, test, PIPELINE / "evaluation" / strategy, config.evaluate.batch_size, history)
    write_json(METRICS / f"eval-{strategy}.json", result.metrics)
    predictions = pd.DataFrame({"path": test.paths, "actual": [model.labels[i] for i in test.labels.tolist()],
                                "predicted": [model.labels[i] for i in result.predicted]})
    predictions.to_csv(PLOTS / f"predictions-{strategy}.csv", index=False)


def export(config: Config, strategy: str) -> None:
    """In: export.precisions, evaluate.batch_size and the trained model. Out: exports and their records."""
    from vitflow.export import export_and_verify

    records = export_and_verify(model_root(strategy) / "model", CACHE_DIR, PIPELINE / "exports" / strategy,
                                config.export.precisions, config.evaluate.batch_size, config.train.device)
    write_json(METRICS / f"export-{strategy}.json",
               {record["precision"]: {key: value for key, value in record.items() if key not in ("precision", "path")}
                for record in records})


STAGES = {"foundation": foundation, "prepare": prepare}
STRATEGY_STAGES = {"train": train, "evaluate": evaluate, "export": export}


def main(argv: list[str] | None = None) -> int:
    """Run one stage with params.yaml; prints a one-line error and returns its exit code on bad input or data."""
    parser = argparse.ArgumentParser(prog="python -m vitflow.stages", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--params", default=str(PARAMS_FILE), help="the config file (default: params.yaml)")
    stages = parser.add_subparsers(dest="stage", required=True)
    for name in STAGES:
        stages.add_parser(name)
    for name in STRATEGY_STAGES:
        stages.add_parser(name, help=f"{name} one strategy").add_argument("--strategy", required=True)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.params)
        if len(config.model.sources) > 1 and args.stage != "foundation":
            raise VitflowError(f"{args.params}: model.source names {len(config.model.sources)} models; the DVC "
                               "pipeline trains one: set one there, or run them all with `vitflow run --model a,b`")
        if args.stage in STAGES:
            STAGES[args.stage](config)
        else:
            STRATEGY_STAGES[args.stage](config, args.strategy)
    except VitflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`vitflow predict` and `vitflow explain`: a registered or saved model on image files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitflow.config import load_config
from vitflow.errors import VitflowError
from vitflow.paths import PARAMS_FILE


def add_commands(commands) -> None:
    predict = commands.add_parser("predict", help="top-k labels for images, from the champion by default")
    predict.add_argument("images", nargs="+",
                         help="image files, folders (searched recursively) or quoted glob patterns ('shots/**/*.png')")
    predict.add_argument("--model", help="MLflow model URI (models:/NAME@ALIAS, runs:/...) or a checkpoint directory")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    predict.add_argument("--output", metavar="FILE",
                         help="write one row per image to FILE (.csv or .jsonl) instead of printing a table")
    predict.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8"], default="fp32",
                         help="run the model's export at this precision (default: fp32)")
    predict.add_argument("--params", default=str(PARAMS_FILE), help=argparse.SUPPRESS)
    predict.set_defaults(handler=predict_command)

    explain = commands.add_parser("explain", help="one image beside its rollout heatmap, with a colour scale")
    explain.add_argument("image", help="image file")
    explain.add_argument("--model", help="MLflow model URI or checkpoint directory (default: the champion)")
    explain.add_argument("--method", choices=["gradient", "plain"],
                         help="gradient: class-specific rollout; plain: attention alone (default: explain.method)")
    explain.add_argument("--head-fusion", choices=["mean", "max", "min"],
                         help="how plain rollout fuses the heads (default: explain.head_fusion)")
    explain.add_argument("--discard", type=float, metavar="RATIO",
                         help="drop this fraction of the weakest attention per layer (default: explain.discard_ratio)")
    explain.add_argument("--class", dest="class_label", metavar="LABEL",
                         help="gradient rollout for LABEL (default: the predicted class)")
    explain.add_argument("--out", help="output PNG (default: <image name>.rollout.png in the current directory)")
    explain.add_argument("--params", default=str(PARAMS_FILE), help=argparse.SUPPRESS)
    explain.set_defaults(handler=explain_command)


def predict_command(args: argparse.Namespace) -> int:
    from vitflow.loading import resolve_runner
    from vitflow.prediction import OUTPUT_SUFFIXES, find_images, predict_files, write_predictions

    if args.output and Path(args.output).suffix not in OUTPUT_SUFFIXES:
        raise VitflowError(f"--output {args.output}: name a {' or '.join(OUTPUT_SUFFIXES)} file")
    if args.output and not Path(args.output).parent.is_dir():
        raise VitflowError(f"--output {args.output}: folder {Path(args.output).parent} does not exist")
    for option, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size)):
        if value < 1:
            raise VitflowError(f"{option} {value}: must be 1 or more")
    paths, skipped = find_images(args.images)
    config = load_config(args.params)
    model = resolve_runner(args.model, args.precision, config.registry.model_name, config.train.device)
    predictions, unreadable = predict_files(model, paths, args.top_k, args.batch_size)
    skipped += unreadable
    if not predictions:
        raise VitflowError(f"no readable image among {len(paths)}: {'; '.join(skipped)}")
    if args.output:
        write_predictions(predictions, Path(args.output))
        print(f"{len(predictions)} predictions written to {args.output}")
    else:
        for path, ranking in predictions:
            print(path)
            for label, probability in ranking.items():
                print(f"  {label:<24} {probability:.4f}")
    if skipped:
        print(f"skipped {len(skipped)}: {'; '.join(skipped)}", file=sys.stderr)
    return 0


def explain_command(args: argparse.Namespace) -> int:
    from vitflow.devices import resolve_device
    from vitflow.explain.heatmaps import explain_image
    from vitflow.loading import resolve_model

    if not Path(args.image).is_file():
        raise VitflowError(f"{args.image}: no such image file")
    config = load_config(args.params)
    settings = config.explain
    method = args.method or settings.method
    head_fusion = args.head_fusion or (settings.head_fusion if method == "plain" else "mean")
    discard = settings.discard_ratio if args.discard is None else args.discard
    model = resolve_model(args.model, config.registry.model_name).to(resolve_device(config.train.device))
    out = args.out or f"{Path(args.image).stem}.rollout.png"
    result = explain_image(model, args.image, out, method, head_fusion, discard, args.class_label)
    target = f" for class {result['class']}" if result["class"] else ""
    print(f"predicted {result['predicted']} (p={result['probability']:.3f}); "
          f"{method} rollout{target} written to {result['path']}")
    return 0

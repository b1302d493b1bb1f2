"""`vitflow predict` and `vitflow explain`: a registered or saved model on image files."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitflow.config import load_config
from vitflow.errors import VitflowError
from vitflow.paths import PARAMS_FILE

PREDICT_BATCH_SIZE = 32


def add_commands(commands) -> None:
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


def predict_command(args: argparse.Namespace) -> int:
    import torch

    from vitflow.data.images import load_image
    from vitflow.inference import predict_logits
    from vitflow.loading import resolve_runner

    missing = [image for image in args.images if not Path(image).is_file()]
    if missing:
        raise VitflowError(f"{missing[0]}: no such image file")
    model = resolve_runner(args.model, args.precision, load_config(args.params).registry.model_name)
    images = torch.stack([load_image(image_path, model.data_config) for image_path in args.images])
    probabilities = predict_logits(model, images, PREDICT_BATCH_SIZE).softmax(1)
    top = probabilities.topk(min(args.top_k, len(model.labels)))
    for image_path, scores, indices in zip(args.images, top.values.tolist(), top.indices.tolist(), strict=True):
        print(image_path)
        for score, index in zip(scores, indices, strict=True):
            print(f"  {model.labels[index]:<24} {score:.4f}")
    return 0


def explain_command(args: argparse.Namespace) -> int:
    from vitflow.explain.heatmaps import explain_image
    from vitflow.loading import resolve_model

    if not Path(args.image).is_file():
        raise VitflowError(f"{args.image}: no such image file")
    model = resolve_model(args.model, load_config(args.params).registry.model_name)
    out = args.out or f"{Path(args.image).stem}.rollout.png"
    result = explain_image(model, args.image, out, args.head_fusion, args.discard, args.class_label)
    target = f" for class {result['class']}" if result["class"] else ""
    print(f"predicted {result['predicted']} (p={result['probability']:.3f}); "
          f"rollout{target} written to {result['path']}")
    return 0

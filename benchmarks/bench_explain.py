"""Benchmark how faithful the rollout heatmaps are: deletion AUC of gradient and plain rollout against random.

    uv run python -m benchmarks.bench_explain [--model-dir DIR] [--cache DIR] [--images 32]

Defaults: the local registry's champion and the newest preprocessed cache in .vitflow/cache. Test images are
taken classes in turn, in path order; each is explained for its predicted class, on the `train.device` device.
Deletion AUC: the predicted class's probability as patches are greyed out, most important first (lower is
more faithful); random: the mean over seeded random orders of the same images.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from benchmarks.machine import machine
from vitflow.config import load_config
from vitflow.data.cache import is_readable_cache, load_split
from vitflow.data.images import normalize
from vitflow.devices import resolve_device
from vitflow.explain.faithfulness import DELETION_STEPS, RANDOM_ORDERS, area_under_curve, deletion_curve
from vitflow.explain.heatmaps import choose_images, explain
from vitflow.inference import predict_logits
from vitflow.models import load_model
from vitflow.paths import work_dir
from vitflow.serving import logged_model_dir
from vitflow.tracking import configure_mlflow


def champion_dir() -> str:
    configure_mlflow()
    return str(logged_model_dir(f"models:/{load_config().registry.model_name}@champion"))


def deletion_aucs(model, pixels: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, steps: int,
                  batch_size: int) -> torch.Tensor:
    """Per-image deletion AUC [N], `batch_size` images at a time."""
    return torch.cat([area_under_curve(deletion_curve(model, pixels[i : i + batch_size], maps[i : i + batch_size],
                                                      targets[i : i + batch_size], steps)).cpu()
                      for i in range(0, len(pixels), batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model-dir", help="a saved vitflow checkpoint (default: the champion)")
    parser.add_argument("--cache", help="preprocessed data (default: newest in .vitflow/cache)")
    parser.add_argument("--images", type=int, default=32, help="test images to explain (default: 32)")
    parser.add_argument("--steps", type=int, default=DELETION_STEPS)
    parser.add_argument("--random-orders", type=int, default=RANDOM_ORDERS)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    model_dir = args.model_dir or champion_dir()
    caches = [path for path in (work_dir() / "cache").glob("[!.]*") if is_readable_cache(path)]
    cache = args.cache or str(max(caches, key=lambda path: path.stat().st_mtime))
    test = load_split(cache, "test")
    device = resolve_device(load_config().train.device)
    model = load_model(model_dir).to(device).eval()

    chosen = choose_images(test.paths, test.labels.tolist(), [False] * len(test.paths), args.images)
    pixels = normalize(test.images[chosen].to(device), model.data_config)
    targets = predict_logits(model, test.images[chosen], args.batch_size).argmax(1)
    explain(model.model, pixels[:1])  # warm-up

    maps, seconds, aucs = {}, {}, {}
    for method in ("gradient", "plain"):
        start = time.perf_counter()
        maps[method] = torch.cat([
            explain(model.model, pixels[i : i + args.batch_size],
                    target_class=targets[i : i + args.batch_size] if method == "gradient" else None)[0]
            for i in range(0, len(chosen), args.batch_size)])
        seconds[method] = (time.perf_counter() - start) / len(chosen)
        aucs[f"{method} rollout"] = deletion_aucs(model, pixels, maps[method], targets, args.steps, args.batch_size)
    generator = torch.Generator().manual_seed(0)
    random_aucs = torch.stack([
        deletion_aucs(model, pixels, torch.rand(maps["plain"].shape, generator=generator).to(device), targets,
                      args.steps, args.batch_size)
        for _ in range(args.random_orders)]).mean(0)
    aucs[f"random order (mean of {args.random_orders})"] = random_aucs
    table = pd.DataFrame([{"order": name, "deletion AUC": values.mean().item(),
                           "± s.e.": (values.std() / len(values) ** 0.5).item()} for name, values in aucs.items()])
    table = table.set_index("order")
    table["vs random"] = table["deletion AUC"] - random_aucs.mean().item()

    # Where the plain map peaks on a patch the gradient map leaves below half its own peak: the high-norm tokens.
    peaks = maps["plain"].flatten(1).argmax(1)
    off_object = (maps["gradient"].flatten(1).gather(1, peaks[:, None])[:, 0] < 0.5).float().mean().item()

    print(f"machine: {machine()}; device: {device}")
    print(f"model: {model_dir} ({model.data_config.image_size}px), {len(chosen)} test images "
          f"(classes in turn), {args.steps} deletion steps\n")
    print(table.to_markdown(floatfmt=".3f"))
    print(f"\nrollout: gradient {seconds['gradient']:.3f} s per image, plain {seconds['plain']:.3f} s per image; "
          f"plain rollout's peak patch is below half of the gradient map's peak in {off_object:.0%} of the images")


if __name__ == "__main__":
    main()

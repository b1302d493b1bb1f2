"""Benchmark vitflow's `full` fine-tuning against Hugging Face's `Trainer`, and print a table for the README.

    uv run python -m benchmarks.bench_trainer [--precisions fp32,bf16] [--epochs 5]

The same model (params.yaml's `model.source` with a fresh 2-class head), the same train/val/test split of the
shipped ants vs bees (vitflow's manifest), image size, epochs, batch size, learning rates (backbone and head),
weight decay, warm-up + cosine schedule, gradient clipping, loader workers and seed on both sides, and a
validation pass every epoch on both. The Trainer is used as a user would: a torch Dataset that decodes the JPEGs
each epoch with torchvision transforms; vitflow trains from its preprocessed cache (the flow's, built when
missing). Each training runs in a fresh process, per precision: the Trainer, vitflow as params.yaml sets it, and
vitflow on every patch (`train.full.patch_dropout=0`: the same computation as the Trainer's, step for step).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks.machine import machine
from benchmarks.runs import (
    cpu_seconds,
    in_fresh_process,
    load_average,
    peak_rss_mb,
    shipped_cache,
    train_full,
    use_threads,
)

TRAINER = "transformers.Trainer"
RUNS = {  # framework -> (--measure, vitflow's overrides)
    TRAINER: ("trainer", []),
    "vitflow full": ("vitflow", []),
    "vitflow full, every patch": ("vitflow", ["train.full.patch_dropout=0"]),
}


def jpeg_split(manifest: pd.DataFrame, root: Path, split: str, labels: list[str], transform):
    """One split of the manifest as a torch Dataset of {"pixel_values", "labels"}: each JPEG decoded when read."""
    from PIL import Image
    from torch.utils.data import Dataset

    rows = manifest[(manifest["status"] == "ok") & (manifest["split"] == split)].sort_values("path")
    samples = [(root / path, labels.index(label)) for path, label in zip(rows["path"], rows["label"], strict=True)]

    class JpegImages(Dataset):
        def __len__(self) -> int:
            return len(samples)

        def __getitem__(self, index: int) -> dict:
            path, label = samples[index]
            with Image.open(path) as image:
                return {"pixel_values": transform(image.convert("RGB")), "labels": label}

    return JpegImages()


def train_with_trainer(manifest_csv: str, image_size: int, precision: str, epochs: int) -> dict:
    """Fine-tune the whole model with `transformers.Trainer` on the manifest's JPEGs; fp32 test accuracy."""
    import torch
    from torch import nn
    from torchvision import transforms
    from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments, set_seed
    from transformers.trainer_pt_utils import get_parameter_names

    from vitflow.config import load_config
    from vitflow.paths import project_path
    from vitflow.training.engine import loader_workers

    config = load_config()
    settings, root = config.train, project_path(config.data.path)
    manifest = pd.read_csv(manifest_csv, keep_default_na=False)
    labels = sorted(manifest.loc[manifest["status"] == "ok", "label"].unique())
    processor = AutoImageProcessor.from_pretrained(config.model.source)
    resize = round(processor.size["shortest_edge"] * image_size / processor.crop_size["height"])
    normalize = transforms.Normalize(processor.image_mean, processor.image_std)
    bicubic = transforms.InterpolationMode.BICUBIC
    train_transform = transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(settings.crop_scale_min, 1.0), interpolation=bicubic),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
    eval_transform = transforms.Compose([transforms.Resize(resize, interpolation=bicubic),
                                         transforms.CenterCrop(image_size), transforms.ToTensor(), normalize])
    train = jpeg_split(manifest, root, "train", labels, train_transform)
    val, test = (jpeg_split(manifest, root, split, labels, eval_transform) for split in ("val", "test"))

    set_seed(settings.seed)
    model = AutoModelForImageClassification.from_pretrained(
        config.model.source, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)})
    decay = {name for name in get_parameter_names(model, [nn.LayerNorm]) if "bias" not in name}
    groups: dict[tuple[float, float], list] = {}
    for name, parameter in model.named_parameters():
        lr = settings.lr_head if name.startswith("classifier.") else settings.lr_backbone
        groups.setdefault((lr, settings.weight_decay if name in decay else 0.0), []).append(parameter)
    optimizer = torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": wd}
                                   for (lr, wd), params in groups.items()])

    def accuracy(prediction) -> dict:
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    with tempfile.TemporaryDirectory(prefix="vitflow-bench-trainer-") as out:
        args = TrainingArguments(
            output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=settings.batch_size,
            per_device_eval_batch_size=settings.batch_size, lr_scheduler_type="cosine",
            warmup_steps=settings.warmup_ratio, weight_decay=settings.weight_decay,
            max_grad_norm=settings.max_grad_norm or 0.0, seed=settings.seed, bf16=precision == "bf16", use_cpu=True,
            eval_strategy="epoch", save_strategy="no", logging_strategy="epoch", report_to=[], disable_tqdm=True,
            dataloader_num_workers=loader_workers(settings, torch.device("cpu")))  # as many as vitflow's
        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, compute_metrics=accuracy,
                          optimizers=(optimizer, None))
        load_before, cpu_before, start = load_average(), cpu_seconds(), time.perf_counter()
        trainer.train()
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_before
        load_after = load_average()
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(test, batch_size=config.evaluate.batch_size):
            correct += int((model(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).sum())
    own_rss, worker_rss = peak_rss_mb()
    return {"precision": precision, "train_images": len(train), "epochs": epochs, "train_s": seconds,
            "images_per_s": len(train) * epochs / seconds, "cpu_s": cpu, "test_accuracy": correct / len(test),
            "peak_rss_mb": own_rss, "worker_peak_rss_mb": worker_rss,
            "load_before": load_before, "load_after": load_after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=168)
    parser.add_argument("--threads", type=int, help="torch threads per training (default: one per core)")
    parser.add_argument("--measure", choices=["trainer", "vitflow"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)  # the manifest CSV (trainer) or the cache (vitflow)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)  # vitflow's overrides
    args = parser.parse_args()
    use_threads(args.threads)
    if args.measure == "trainer":
        print(json.dumps(train_with_trainer(args.data, args.image_size, args.precision, args.epochs)))
        return
    if args.measure == "vitflow":
        print(json.dumps(train_full(args.data, [f"train.epochs={args.epochs}", f"train.precision={args.precision}",
                                                "train.device=cpu", *args.set])))
        return

    cache, manifest = shipped_cache(args.image_size)
    common = ["--epochs", str(args.epochs), "--image-size", str(args.image_size)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vitflow-bench-trainer-") as scratch:
        manifest_csv = Path(scratch) / "manifest.csv"
        manifest.to_csv(manifest_csv, index=False)
        for precision in args.precisions.split(","):
            for framework, (name, overrides) in RUNS.items():
                data = manifest_csv if name == "trainer" else cache
                record = in_fresh_process("benchmarks.bench_trainer", [
                    "--measure", name, "--precision", precision, "--data", str(data), *common,
                    *(f"--set={override}" for override in overrides)])
                rows.append({"framework": framework, **record})
                print(f"{rows[-1]['framework']} {precision}: {record['train_s']:.1f} s, "
                      f"test accuracy {record['test_accuracy']:.4f} (load {record['load_before']} -> "
                      f"{record['load_after']})", flush=True)
    frame = pd.DataFrame(rows)
    table = frame.rename(columns={"train_s": "train s", "images_per_s": "train img/s", "cpu_s": "CPU s",
                                  "test_accuracy": "test accuracy", "peak_rss_mb": "peak RSS MB",
                                  "load_before": "load avg before", "load_after": "load avg after"})[
        ["framework", "precision", "train s", "train img/s", "CPU s", "test accuracy", "peak RSS MB",
         "load avg before", "load avg after"]]
    print(f"\nmachine: {machine()}")
    print(f"shipped ants vs bees at {args.image_size} px: {rows[0]['train_images']} train images x {args.epochs} "
          "epochs, a validation pass over the val split after every epoch on both sides (the Trainer: "
          "eval_strategy='epoch'); test accuracy in fp32 on the same test split; train s: wall time of "
          "trainer.train() / vitflow's fine_tune, img/s: train images x epochs / train s\n")
    print(table.to_markdown(index=False, floatfmt=".4g"))
    print()
    for precision, group in frame.groupby("precision", sort=False):
        theirs = group[group["framework"] == TRAINER].iloc[0]
        for _, ours in group[group["framework"] != TRAINER].iterrows():
            print(f"{precision}: {ours['framework']} / Trainer training time {ours['train_s'] / theirs['train_s']:.2f}x"
                  f" (CPU time {ours['cpu_s'] / theirs['cpu_s']:.2f}x; target <= 0.8x), test accuracy "
                  f"{ours['test_accuracy']:.4f} vs {theirs['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()

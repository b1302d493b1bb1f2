"""Evaluate a fine-tuned model on the test split and write its report artifacts.

In: an `ImageClassifier` and the preprocessed test split.
Out: an `EvalResult` with accuracy, macro-F1, per-class precision and recall, mean latency
per image, and files: confusion matrix (CSV, PNG), classification report (CSV), learning curve (PNG).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd
import torch

from vitflow.data.cache import SplitTensors
from vitflow.data.images import normalize
from vitflow.inference import predict_logits
from vitflow.models import ImageClassifier

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

LATENCY_SAMPLES = 16  # images timed one at a time for the per-image latency


@dataclass
class EvalResult:
    metrics: dict[str, float]  # test_accuracy, test_macro_f1, test_precision_<label>, ..., latency_ms_per_image
    artifacts: list[str]  # files to log with the run
    predicted: list[int]  # the predicted label index of each test image, in the split's order


@torch.no_grad()
def latency_ms_per_image(model: ImageClassifier, images: torch.Tensor, samples: int = LATENCY_SAMPLES) -> float:
    """Mean wall time of a batch-1 forward pass, after one warm-up pass."""
    model.eval()
    images = images[:samples]
    model(normalize(images[:1], model.data_config))
    start = time.perf_counter()
    for image in images:
        model(normalize(image[None], model.data_config))
    return (time.perf_counter() - start) / len(images) * 1000


def evaluate_model(model: ImageClassifier, test: SplitTensors, out_dir: Path | str, batch_size: int,
                   history: list[dict] | None = None) -> EvalResult:
    """Score `model` on `test`; write the report files into `out_dir`."""
    # imported here: scikit-learn takes seconds to import, and a flow with nothing to do never evaluates
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predicted = predict_logits(model, test.images, batch_size).argmax(1).cpu().numpy()
    truth = test.labels.numpy()
    label_ids = list(range(len(model.labels)))
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=label_ids,
                                                                     zero_division=0)
    metrics = {"test_accuracy": float(accuracy_score(truth, predicted)),
               "test_macro_f1": float(f1_score(truth, predicted, labels=label_ids, average="macro", zero_division=0)),
               "latency_ms_per_image": latency_ms_per_image(model, test.images)}
    for label, p, r in zip(model.labels, precision, recall, strict=True):
        metrics[f"test_precision_{label}"] = float(p)
        metrics[f"test_recall_{label}"] = float(r)

    report = pd.DataFrame({"label": model.labels, "precision": precision, "recall": recall, "f1": f1,
                           "support": support})
    report.to_csv(out_dir / "classification_report.csv", index=False)
    matrix = pd.DataFrame(confusion_matrix(truth, predicted, labels=label_ids),
                          index=pd.Index(model.labels, name="true"), columns=pd.Index(model.labels, name="predicted"))
    matrix.to_csv(out_dir / "confusion_matrix.csv")
    plot_confusion_matrix(matrix, out_dir / "confusion_matrix.png")
    artifacts = [out_dir / "classification_report.csv", out_dir / "confusion_matrix.csv",
                 out_dir / "confusion_matrix.png"]
    if history:
        plot_learning_curve(history, out_dir / "learning_curve.png")
        artifacts.append(out_dir / "learning_curve.png")
    return EvalResult(metrics=metrics, artifacts=[str(path) for path in artifacts], predicted=predicted.tolist())


def plot_confusion_matrix(matrix: pd.DataFrame, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(1.2 * len(matrix) + 2, 1.2 * len(matrix) + 1.5))
    axes.imshow(matrix.to_numpy(), cmap="Blues")
    axes.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=45, ha="right")
    axes.set_yticks(range(len(matrix.index)), matrix.index)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, column), count in pd.DataFrame(matrix.to_numpy()).stack().items():
        axes.text(column, row, str(count), ha="center", va="center")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_learning_curve(history: list[dict], path: Path) -> None:
    frame = pd.DataFrame(history)
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(9, 3.5))
    frame.plot(x="epoch", y=["train_loss", "val_loss"], ax=loss_axes, marker="o", title="loss")
    frame.plot(x="epoch", y="val_accuracy", ax=accuracy_axes, marker="o", title="validation accuracy", legend=False)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

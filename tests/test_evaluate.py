import pandas as pd
import torch

from vitflow.data.cache import SplitTensors
from vitflow.evaluation import evaluate_model
from vitflow.inference import predict_logits
from vitflow.models import load_model

LABELS = ["ants", "bees", "wasps"]


def test_metrics_and_reports_agree_with_the_predictions(tiny_hf_model, tmp_path):
    torch.manual_seed(0)
    model = load_model(str(tiny_hf_model), LABELS)
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(24) % 3
    test = SplitTensors(images, labels, [f"{i}.jpg" for i in range(24)])
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.4},
               {"epoch": 2, "train_loss": 0.8, "val_loss": 0.9, "val_accuracy": 0.6}]

    result = evaluate_model(model, test, tmp_path, batch_size=8, history=history)

    predicted = predict_logits(model, images, batch_size=5).argmax(1)
    assert result.metrics["test_accuracy"] == (predicted == labels).float().mean().item()
    matrix = pd.read_csv(tmp_path / "confusion_matrix.csv", index_col=0)
    assert matrix.to_numpy().sum() == 24
    assert list(matrix.index) == LABELS and list(matrix.columns) == LABELS
    assert int(matrix.to_numpy().trace()) == int((predicted == labels).sum())
    for index, label in enumerate(LABELS):
        true_count = int((labels == index).sum())
        assert result.metrics[f"test_recall_{label}"] == matrix.loc[label, label] / true_count
    report = pd.read_csv(tmp_path / "classification_report.csv")
    assert report["support"].tolist() == [8, 8, 8]
    assert 0 <= result.metrics["test_macro_f1"] <= 1
    assert result.metrics["latency_ms_per_image"] > 0
    for name in ("confusion_matrix.png", "learning_curve.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result.artifacts) == 4

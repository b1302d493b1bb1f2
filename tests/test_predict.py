"""Batch prediction (`vitflow predict` over files, folders and globs, CSV and JSON-lines output) and the served
pyfunc model's output and bad-input replies, through MLflow's own scoring-server app."""

import base64
import csv
import io
import json
import sys
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vitflow.cli import main
from vitflow.models import load_model
from vitflow.precision import load_exported
from vitflow.prediction import find_images, predict_files

LABELS = ["ants", "bees", "wasps"]


@pytest.fixture(scope="module")
def model_dir(tiny_hf_model, tmp_path_factory) -> Path:
    return load_model(str(tiny_hf_model), labels=LABELS).save(tmp_path_factory.mktemp("predict") / "model")


def noise(seed: int) -> Image.Image:
    """A random RGB image, so that every image gets its own probabilities."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30 + seed, 40, 3), dtype=np.uint8))


def write_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise(seed).save(path)
    return path


def encoded(seed: int, image_format: str) -> bytes:
    buffer = io.BytesIO()
    noise(seed).save(buffer, image_format)
    return buffer.getvalue()


@pytest.fixture
def images(tmp_path) -> tuple[list[str], list[str], Path]:
    """(arguments: a folder with a nested subfolder, an overlapping glob, a glob elsewhere and a file;
    the readable images they name, in the order predict gives them; the corrupt one among them)."""
    readable = [write_image(tmp_path / "shots" / "a.png", 0), write_image(tmp_path / "shots" / "b.JPG", 1),
                write_image(tmp_path / "shots" / "nested" / "c.png", 2),
                write_image(tmp_path / "other" / "deep" / "d.png", 3), write_image(tmp_path / "other" / "e.png", 4),
                write_image(tmp_path / "single.bmp", 5)]
    corrupt = tmp_path / "shots" / "nested" / "broken.png"
    corrupt.write_bytes(readable[0].read_bytes()[:60])  # a PNG header and nothing after it
    (tmp_path / "shots" / "notes.txt").write_text("not an image, not searched for")
    arguments = [str(tmp_path / "shots"), str(tmp_path / "shots" / "nested" / "*.png"),
                 str(tmp_path / "other" / "**" / "*.png"), str(tmp_path / "single.bmp")]
    return arguments, [str(path) for path in readable], corrupt


def read_rows(output: Path) -> list[dict]:
    if output.suffix == ".csv":
        with output.open() as handle:
            return list(csv.DictReader(handle))
    return [json.loads(line) for line in output.read_text().splitlines()]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_predict_writes_one_row_per_readable_image_and_lists_the_skipped(suffix, images, model_dir, tmp_path,
                                                                        capsys):
    arguments, readable, corrupt = images
    every, top2 = tmp_path / f"every{suffix}", tmp_path / f"top2{suffix}"
    for output, top_k in ((every, 3), (top2, 2)):
        assert main(["predict", *arguments, "--model", str(model_dir), "--top-k", str(top_k), "--batch-size", "4",
                     "--output", str(output)]) == 0
        captured = capsys.readouterr()
        assert captured.out.strip() == f"{len(readable)} predictions written to {output}"
        skipped = captured.err.strip().splitlines()[-1]
        assert skipped.startswith(f"skipped 1: {corrupt} (unreadable image: ")

    rows = read_rows(every)
    assert [row["path"] for row in rows] == readable  # argument order, each file once
    for row in rows:
        assert list(row) == ["path", "label_1", "probability_1", "label_2", "probability_2", "label_3",
                             "probability_3"]
        probabilities = [float(row[f"probability_{rank}"]) for rank in (1, 2, 3)]
        assert sum(probabilities) == pytest.approx(1, abs=1e-6)
        assert probabilities == sorted(probabilities, reverse=True)
        assert {row[f"label_{rank}"] for rank in (1, 2, 3)} == set(LABELS)
    assert read_rows(top2) == [{key: value for key, value in row.items() if not key.endswith("_3")} for row in rows]


def test_batches_give_the_same_probabilities_as_one_image_at_a_time(images, model_dir):
    paths, _ = find_images(images[0])
    model = load_exported(model_dir)
    one_by_one, skipped_alone = predict_files(model, paths, 3, batch_size=1)
    batched, skipped_batched = predict_files(model, paths, 3, batch_size=4)
    assert [path for path, _ in batched] == [path for path, _ in one_by_one] and len(batched) == 6
    for (_, alone), (_, together) in zip(one_by_one, batched, strict=True):
        assert list(alone) == list(together)
        assert np.allclose(list(alone.values()), list(together.values()), atol=1e-6)
    assert skipped_alone == skipped_batched and len(skipped_alone) == 1


@pytest.mark.parametrize("arguments, says", [
    (["{tmp}/nowhere", "{tmp}/*.png"], "no image files found in {tmp}/nowhere {tmp}/*.png"),
    (["{tmp}", "--output", "{tmp}/preds.txt"], "--output {tmp}/preds.txt: name a .csv or .jsonl file"),
    (["{tmp}", "--top-k", "0"], "--top-k 0: must be 1 or more"),
])
def test_predict_refuses_bad_arguments_in_one_line(arguments, says, model_dir, tmp_path, capsys):
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    assert main(["predict", *arguments, "--model", str(model_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {says.format(tmp=tmp_path)}") and captured.err.count("\n") == 1
    assert captured.out == ""


# --- the served model -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(model_dir):
    """The model logged as `vitflow run` logs it, loaded as `mlflow models serve` loads it."""
    from vitflow.tracking import configure_mlflow, ensure_experiment, log_pyfunc_model

    client = configure_mlflow()
    run = client.create_run(ensure_experiment(client, "served-predictions"))
    uri = log_pyfunc_model(run.info.run_id, "model", str(model_dir), {}).model_uri
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "path", list(sys.path))  # loading prepends the model's code copy
        yield mlflow.pyfunc.load_model(uri)


def test_the_served_model_gives_label_probability_and_every_class(served):
    frame = pd.DataFrame({"image": [encoded(0, "PNG"), encoded(1, "JPEG")]})
    predictions = served.predict(frame)
    assert list(predictions.columns) == ["label", "probability", "probabilities"] and len(predictions) == 2
    for row in predictions.itertuples():
        assert list(row.probabilities) == sorted(row.probabilities, key=row.probabilities.get, reverse=True)
        assert set(row.probabilities) == set(LABELS) and sum(row.probabilities.values()) == pytest.approx(1)
        assert (row.label, row.probability) == next(iter(row.probabilities.items()))
    top2 = served.predict(frame, params={"top_k": 2})
    assert [list(ranking) for ranking in top2["probabilities"]] == [list(ranking)[:2]
                                                                   for ranking in predictions["probabilities"]]


@pytest.fixture
def scoring_client(served, monkeypatch):
    """MLflow's scoring-server app (what `mlflow models serve` runs) on the served model, called in-process."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")  # set by the app; undone after the test
    return TestClient(scoring_server.init(served))


def invoke(client, columns: list[str], values: list, params: dict | None = None):
    body = {"dataframe_split": {"columns": columns, "data": [[value] for value in values]}}
    return client.post("/invocations", json={**body, **({"params": params} if params else {})})


def test_the_scoring_server_answers_json_with_every_class(scoring_client):
    reply = invoke(scoring_client, ["image"], [base64.b64encode(encoded(0, "PNG")).decode()], {"top_k": 2})
    assert reply.status_code == 200
    [prediction] = reply.json()["predictions"]
    assert set(prediction) == {"label", "probability", "probabilities"} and len(prediction["probabilities"]) == 2
    assert prediction["label"] == next(iter(prediction["probabilities"]))


@pytest.mark.parametrize("columns, value, says", [
    (["image"], base64.b64encode(b"hello").decode(), "image 0: unknown image format"),
    (["image"], "not base64!", "Invalid base64-encoded string"),
    (["picture"], base64.b64encode(encoded(0, "PNG")).decode(), "no 'image' column"),
])
def test_the_scoring_server_rejects_bad_input_with_a_400_in_one_line(scoring_client, columns, value, says):
    reply = invoke(scoring_client, columns, [value])
    assert reply.status_code == 400
    error = reply.json()
    assert says in error["message"] and "\n" not in error["message"]
    assert "stack_trace" not in error and "Traceback" not in reply.text

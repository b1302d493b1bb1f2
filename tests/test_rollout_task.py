"""The rollout grid, the attention-rollout task and single-image explanations (vitflow.explain, tasks.explain)."""


import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tasks.explain import artifact_key, rollout_task
from vitflow.config import ExplainConfig
from vitflow.data.cache import SplitTensors, load_split, preprocess_dataset
from vitflow.data.images import load_image, normalize
from vitflow.errors import VitflowError
from vitflow.explain.figures import overlay_heatmap
from vitflow.explain.heatmaps import choose_images, explain, explain_image, rollout_grid
from vitflow.models import load_model
from vitflow.tracking import configure_mlflow

LABELS = ["normal", "pneumonia"]


def preprocess_test_split(folder, data_config, cache_dir):
    """The test images of an image folder as a preprocessed cache file."""
    rows = [{"path": str(path.relative_to(folder)), "label": path.parent.name, "split": "test", "checksum": "",
             "status": "ok"} for path in sorted((folder / "test").rglob("*.png"))]
    return preprocess_dataset(pd.DataFrame(rows), folder, data_config, LABELS, cache_dir, progress=False)


def shuffled(split: SplitTensors, seed: int = 0) -> SplitTensors:
    """The same split in a random row order, so path order must come from the paths themselves."""
    order = torch.randperm(len(split.paths), generator=torch.Generator().manual_seed(seed)).tolist()
    return SplitTensors(split.images[order], split.labels[order], [split.paths[i] for i in order])


def as_pil(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


@pytest.fixture(scope="module", params=["hf", "timm"])
def model(request, tiny_hf_model, tiny_timm_model):
    torch.manual_seed(0)
    return load_model(str(tiny_hf_model if request.param == "hf" else tiny_timm_model), LABELS)


@pytest.fixture(scope="module")
def test_split(model, pneumonia_folder, tmp_path_factory):
    """60 real chest X-rays (30 per class), shuffled."""
    cache = preprocess_test_split(pneumonia_folder, model.data_config, tmp_path_factory.mktemp("cache") / "c.st")
    return shuffled(load_split(cache, "test"))


def test_choose_images_puts_misclassified_first_in_path_order():
    paths = ["d", "b", "a", "c", "e"]
    wrong = [True, False, True, True, False]  # misclassified: a, c, d; correct: b, e
    assert choose_images(paths, wrong, 4) == [2, 3, 1, 4]
    assert choose_images(paths, wrong, 5) == [2, 3, 0, 1, 4]  # too few correct ones: more misclassified
    assert choose_images(paths, wrong, 9) == [2, 3, 0, 1, 4]
    assert choose_images(paths, wrong, 1) == [1]
    assert choose_images(paths, [False] * 5, 3) == [2, 1, 3]


def test_rollout_grid_explains_misclassified_first_and_draws_one_png(model, test_split, tmp_path):
    result = rollout_grid(model, test_split, tmp_path / "grid.png", count=6, batch_size=4)

    with torch.no_grad():
        probabilities = model(normalize(test_split.images, model.data_config)).softmax(1)
    pred = probabilities.argmax(1)
    by_path = sorted(range(len(test_split.paths)), key=test_split.paths.__getitem__)
    wrong = [i for i in by_path if pred[i] != test_split.labels[i]]
    right = [i for i in by_path if pred[i] == test_split.labels[i]]
    assert len(wrong) >= 3 and len(right) >= 3  # two balanced classes: one side errs whatever the model says
    expected = wrong[:3] + right[:3]
    assert [image["path"] for image in result["images"]] == [test_split.paths[i] for i in expected]
    for image, i in zip(result["images"], expected, strict=True):
        assert image["true"] == LABELS[test_split.labels[i]]
        assert image["pred"] == LABELS[pred[i]]
        assert image["prob"] == pytest.approx(probabilities[i].max().item(), abs=1e-5)
    assert result["misclassified"] == 3
    assert result["seconds_per_image"] > 0

    with Image.open(result["path"]) as png:
        assert png.format == "PNG"
        assert png.width / png.height == pytest.approx((3 * 4) / (3.3 * 2), rel=0.01)  # 4 columns, 2 rows

    again = rollout_grid(model, test_split, tmp_path / "again.png", count=6, batch_size=16)
    assert [{**image, "prob": pytest.approx(image["prob"], abs=1e-6)} for image in result["images"]] == again["images"]


def test_rollout_grid_draws_at_most_the_images_there_are(model, tmp_path):
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    split = SplitTensors(images, torch.tensor([0, 1, 0]), ["c.png", "a.png", "b.png"])
    result = rollout_grid(model, split, tmp_path / "grid.png", count=8, head_fusion="max", discard_ratio=0.5)
    assert sorted(image["path"] for image in result["images"]) == ["a.png", "b.png", "c.png"]
    with Image.open(result["path"]) as png:
        assert png.width / png.height == pytest.approx((3 * 3) / 3.3, rel=0.01)  # 3 columns, 1 row
    with pytest.raises(VitflowError, match="explain.images"):
        rollout_grid(model, split, tmp_path / "none.png", count=0)


def test_explain_image_writes_the_overlay_the_model_sees(model, pneumonia_folder, tmp_path):
    image_path = next((pneumonia_folder / "test" / "pneumonia").glob("*.png"))
    pixels = load_image(image_path, model.data_config)
    with torch.no_grad():
        probabilities = model(normalize(pixels[None], model.data_config)).softmax(1)[0]

    plain = explain_image(model, image_path, tmp_path / "plain.png", head_fusion="min")
    assert plain["predicted"] == LABELS[probabilities.argmax()]
    assert plain["probability"] == pytest.approx(probabilities.max().item(), abs=1e-5)
    assert plain["class"] is None
    maps, _ = explain(model.model, normalize(pixels[None], model.data_config), "min")
    with Image.open(plain["path"]) as png:
        assert png.format == "PNG"
        np.testing.assert_array_equal(np.asarray(png), np.asarray(overlay_heatmap(as_pil(pixels), maps[0])))

    guided = explain_image(model, image_path, tmp_path / "guided.png", class_label="normal")
    assert guided["class"] == "normal" and guided["predicted"] == plain["predicted"]
    maps, _ = explain(model.model, normalize(pixels[None], model.data_config), target_class=0)
    with Image.open(guided["path"]) as png:
        np.testing.assert_array_equal(np.asarray(png), np.asarray(overlay_heatmap(as_pil(pixels), maps[0])))


def test_explain_image_refuses_bad_input(model, pneumonia_folder, tmp_path):
    image_path = next((pneumonia_folder / "test" / "normal").glob("*.png"))
    with pytest.raises(VitflowError, match="'covid'.*normal, pneumonia"):
        explain_image(model, image_path, tmp_path / "x.png", class_label="covid")
    with pytest.raises(VitflowError, match="mean only"):
        explain_image(model, image_path, tmp_path / "x.png", head_fusion="max", class_label="normal")
    with pytest.raises(VitflowError, match="head_fusion"):
        explain_image(model, image_path, tmp_path / "x.png", head_fusion="median")
    with pytest.raises(VitflowError, match="not a readable image"):
        explain_image(model, tmp_path / "missing.png", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_artifact_key_is_lowercase_letters_digits_and_dashes():
    assert artifact_key("feature_extraction") == "rollout-feature-extraction"
    assert artifact_key("Full (ViT-S/14)") == "rollout-full-vit-s-14"


def test_rollout_task_logs_the_grid_to_the_mlflow_run_and_reports_it(tiny_hf_model, pneumonia_folder, tmp_path):
    """The real task, run by Prefect: the PNG lands in the MLflow run, the report in a Markdown artifact."""
    from prefect.artifacts import Artifact

    torch.manual_seed(0)
    model_dir = load_model(str(tiny_hf_model), LABELS).save(tmp_path / "model")
    cache = preprocess_test_split(pneumonia_folder, load_model(str(model_dir)).data_config, tmp_path / "c.st")
    client = configure_mlflow()
    experiment_id = client.create_experiment(f"rollout-{tmp_path.name}",
                                             artifact_location=(tmp_path / "mlartifacts").as_uri())
    strategy = f"strategy-{tmp_path.name}"
    run_id = client.create_run(experiment_id, tags={"strategy": strategy}).info.run_id

    result = rollout_task(str(model_dir), str(cache), run_id, ExplainConfig(images=4, head_fusion="mean",
                                                                             discard_ratio=0.0))

    assert [item.path for item in client.list_artifacts(run_id, "rollout")] == ["rollout/attention_rollout.png"]
    assert result["artifact_uri"] == client.get_run(run_id).info.artifact_uri + "/rollout/attention_rollout.png"
    assert len(result["images"]) == 4
    artifact = Artifact.get(artifact_key(strategy))
    assert artifact is not None and result["artifact_uri"] in artifact.data
    for image in result["images"]:
        row = f"| `{image['path']}` | {image['true']} | {image['pred']} | {image['prob']:.3f} |"
        assert row in artifact.data

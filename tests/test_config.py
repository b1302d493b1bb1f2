import pytest

from vitflow.config import PARAMS_FILE, apply_override, load_params
from vitflow.errors import VitflowError


def test_project_params_have_every_section():
    params = load_params()
    assert {"foundation", "data", "model", "preprocess", "train", "evaluate", "registry", "mlflow"} <= set(params)
    assert params["train"]["strategies"] == ["full", "partial", "feature_extraction"]


def test_overrides_are_parsed_as_yaml_and_do_not_touch_the_original():
    params = load_params()
    updated = apply_override(params, "train.strategies=[full, partial]")
    updated = apply_override(updated, "train.lr_head=5e-4")
    assert updated["train"]["strategies"] == ["full", "partial"]
    assert updated["train"]["lr_head"] == 5e-4
    assert params["train"]["strategies"] == ["full", "partial", "feature_extraction"]


@pytest.mark.parametrize("override, message", [
    ("train.epochs", "expected KEY=VALUE"),
    ("train.epoch=3", "no setting 'train.epoch'"),
    ("nosuch.epochs=3", "no section 'nosuch'"),
])
def test_bad_overrides_name_the_setting(override, message):
    with pytest.raises(VitflowError, match=message):
        load_params(PARAMS_FILE, [override])


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(VitflowError, match="config file not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "broken.yaml").write_text("train: [unclosed")
    with pytest.raises(VitflowError, match="broken.yaml: not valid YAML"):
        load_params(tmp_path / "broken.yaml")

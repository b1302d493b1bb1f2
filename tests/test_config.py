import pytest

from vitflow.config import apply_override, load_config, read_params
from vitflow.errors import VitflowError
from vitflow.paths import PARAMS_FILE


def test_project_params_load_into_typed_sections():
    config = load_config()
    assert config.train.strategies == ["full", "partial", "feature_extraction"]
    assert config.train.strategy_section("partial") == {"blocks": 2}
    assert isinstance(config.train.lr_head, float) and isinstance(config.train.epochs, int)
    assert config.as_dict()["registry"]["model_name"] == config.registry.model_name


def test_overrides_are_parsed_as_yaml_and_do_not_touch_the_original():
    params = read_params()
    updated = apply_override(params, "train.strategies=[full, partial]")
    updated = apply_override(updated, "train.lr_head=5e-4")
    updated = apply_override(updated, "train.full.lr_head=1e-3")
    assert updated["train"]["strategies"] == ["full", "partial"]
    assert updated["train"]["lr_head"] == 5e-4
    assert updated["train"]["full"]["lr_head"] == 1e-3
    assert params["train"]["strategies"] == ["full", "partial", "feature_extraction"]
    assert "lr_head" not in params["train"]["full"]


@pytest.mark.parametrize("override, message", [
    ("train.epochs", "expected KEY=VALUE"),
    ("epochs=3", "expected SECTION.KEY=VALUE"),
    ("nosuch.epochs=3", "no section 'nosuch'"),
    ("train.epochs.max=3", "'epochs' is a setting, not a section"),
    ("data.seeds=3", "unknown setting 'data.seeds'"),
    ("train.lr_head=abc", "train.lr_head='abc' is not allowed: Input should be a valid number"),
    ("train.epochs=-1", "train.epochs=-1 is not allowed: Input should be greater than or equal to 1"),
    ("train.epochs=2.5", "train.epochs=2.5 is not allowed"),
    ("data.val_fraction=1", "data.val_fraction=1 is not allowed: Input should be less than 1"),
    ("train.lr_backbone=0", "train.lr_backbone=0 is not allowed: Input should be greater than 0"),
    ("explain.head_fusion=median", "explain.head_fusion='median' is not allowed"),
    ("export.precisions=[fp8]", "export.precisions.0='fp8' is not allowed"),
    ("train.strategies=[]", "train.strategies=[] is not allowed"),
])
def test_bad_settings_are_one_line_naming_the_key(override, message):
    with pytest.raises(VitflowError, match=message.replace("[", r"\[").replace("(", r"\(")) as error:
        load_config(PARAMS_FILE, [override])
    assert "\n" not in str(error.value)


def test_missing_setting_and_missing_or_broken_config_file(tmp_path):
    with pytest.raises(VitflowError, match="config file not found"):
        load_config(tmp_path / "params.yaml")
    (tmp_path / "broken.yaml").write_text("train:\n  epochs: 3\n  lr: [unclosed\n")
    with pytest.raises(VitflowError, match=r"broken.yaml: not valid YAML at line \d+, column \d+"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "partial.yaml").write_text(PARAMS_FILE.read_text().replace("  epochs: 5\n", ""))
    with pytest.raises(VitflowError, match="missing setting 'train.epochs'"):
        load_config(tmp_path / "partial.yaml")

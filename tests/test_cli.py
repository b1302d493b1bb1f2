from pathlib import Path

import pytest

from vitflow.cli import build_parser, main
from vitflow.cli.run import run_overrides
from vitflow.models import load_model


def test_run_flags_become_params_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    args = build_parser().parse_args(["run", "--data", "images", "--model", "timm:vit_small_patch16_224",
                                      "--strategies", "full,partial", "--epochs", "2", "--set", "train.seed=7"])
    assert run_overrides(args) == [f"data.path={tmp_path / 'images'}", "model.source=timm:vit_small_patch16_224",
                                   "train.strategies=[full,partial]", "train.epochs=2", "train.seed=7"]


def test_predict_prints_top_k_from_a_checkpoint_directory(tiny_hf_model, tmp_path, capsys):
    model_dir = load_model(str(tiny_hf_model), labels=["ants", "bees", "wasps"]).save(tmp_path / "model")
    image = Path(__file__).resolve().parents[1] / "data" / "test" / "ants"
    image = next(image.glob("*.jpg")) if image.is_dir() else _write_image(tmp_path / "x.png")
    assert main(["predict", str(image), "--model", str(model_dir), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(image)
    assert len(lines) == 3
    scores = [float(line.split()[-1]) for line in lines[1:]]
    assert scores == sorted(scores, reverse=True) and all(0 <= score <= 1 for score in scores)
    assert {line.split()[0] for line in lines[1:]} <= {"ants", "bees", "wasps"}


@pytest.mark.parametrize("problem", ["missing", "not-an-image"])
def test_predict_rejects_bad_images_in_one_line(problem, tiny_hf_model, tmp_path, capsys):
    path = tmp_path / "image.jpg"
    if problem == "not-an-image":
        path.write_text("hello")
    assert main(["predict", str(path), "--model", str(tiny_hf_model)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and str(path) in error and "\n" not in error


def test_predict_without_a_champion_says_what_to_do(tmp_path, capsys):
    image = _write_image(tmp_path / "x.png")
    assert main(["predict", str(image), "--model", "models:/no-such-model@champion"]) == 2
    assert "run `vitflow run` first" in capsys.readouterr().err


def test_run_with_a_missing_data_folder_fails_in_one_line(tmp_path, capsys):
    assert main(["run", "--data", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "nowhere" in error


def _write_image(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (40, 30), (120, 80, 40)).save(path)
    return path


def test_explain_writes_an_overlay_for_one_image(tiny_hf_model, tmp_path, capsys):
    model_dir = load_model(str(tiny_hf_model), labels=["ants", "bees", "wasps"]).save(tmp_path / "model")
    image = _write_image(tmp_path / "x.png")
    out = tmp_path / "overlay.png"
    assert main(["explain", str(image), "--model", str(model_dir), "--class", "bees", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "for class bees" in printed and str(out) in printed
    assert main(["explain", str(image), "--model", str(model_dir), "--class", "hornets"]) == 2
    assert "hornets" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--data", "/nowhere/at/all"], "/nowhere/at/all: data not found"),
    (["--set", "train.lr_head=abc"], "train.lr_head='abc' is not allowed"),
    (["--set", "train.epochs=-1"], "train.epochs=-1 is not allowed"),
    (["--strategies", "full,bogus"], "unknown strategy 'bogus'"),
    (["--model", "/nowhere/model"], "/nowhere/model: not a model directory"),
])
def test_bad_run_input_is_one_line_before_prefect_starts(args, says, tmp_path):
    """A fresh process, as a user runs it: one line on stderr, exit 2, and Prefect never started."""
    import os
    import subprocess
    import sys

    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "VITFLOW_WORK_DIR": str(tmp_path / "work")}
    done = subprocess.run([sys.executable, "-c", "import sys; from vitflow.cli import main; sys.exit(main())", "run",
                           *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: ") and says in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not home.exists() or not any(home.iterdir())

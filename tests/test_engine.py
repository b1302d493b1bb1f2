"""The training engine: device, precision and attention kernel, patch dropout, early stopping to the best epoch,
resume after a kill, gradient accumulation, layer-wise learning rates."""

import pytest
import torch

from vitflow.config import ModelConfig, TrainConfig
from vitflow.data.cache import SplitTensors, load_split
from vitflow.devices import cpu_has_fast_bf16, resolve_attention, resolve_device, resolve_precision
from vitflow.errors import VitflowError
from vitflow.models import load_model
from vitflow.training import loop
from vitflow.training.engine import TrainingObserver, parameter_groups
from vitflow.training.loop import fine_tune, set_trainable, train_or_reuse
from vitflow.training.strategies import resolve

LABELS = ["normal", "pneumonia"]
TRAIN = TrainConfig(strategies=["full"], epochs=3, batch_size=8, lr_backbone=1e-3, lr_head=3e-3, weight_decay=0.01,
                    warmup_ratio=0.1, seed=0, augment=True, crop_scale_min=0.6, precision="fp32", loader_workers=0)


def settings(**changes) -> TrainConfig:
    return TrainConfig(**{**TRAIN.model_dump(), **changes})


@pytest.fixture(scope="module")
def cache(pneumonia_cache):
    return pneumonia_cache


def weights(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


# --------------------------------------------------------------------------- device and precision


def test_auto_precision_is_bf16_only_where_the_hardware_runs_it_fast():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, fast_bf16_cpu=True) == "bf16"
    assert resolve_precision("auto", cpu, fast_bf16_cpu=False) == "fp32"
    assert resolve_precision("fp32", cpu, fast_bf16_cpu=True) == "fp32"  # an explicit value is kept
    assert resolve_precision("bf16", cpu, fast_bf16_cpu=False) == "bf16"
    assert resolve_precision("auto", torch.device("mps")) == "fp32"
    with pytest.raises(VitflowError, match=r"^train.precision=fp16 needs a CUDA GPU .*use bf16 or fp32$"):
        resolve_precision("fp16", cpu)


def test_auto_attention_is_eager_only_for_bf16_on_a_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention("auto", cpu, "bf16") == "eager"
    assert resolve_attention("auto", cpu, "fp32") is None  # the model's own
    assert resolve_attention("auto", cuda, "bf16") is None
    assert resolve_attention("sdpa", cpu, "bf16") == "sdpa"  # an explicit value is kept
    assert resolve_attention("eager", cuda, "fp16") == "eager"


@pytest.mark.parametrize("fixture", ["tiny_hf_model", "tiny_timm_model"])
def test_both_attention_kernels_compute_the_same_and_switch_both_ways(fixture, request):
    model = load_model(str(request.getfixturevalue(fixture)), LABELS).eval()
    pixels = torch.randn(2, 3, 32, 32)
    assert model.attention_kernel == "sdpa"
    with torch.no_grad():
        fused = model(pixels)
        model.set_attention("eager")
        assert model.attention_kernel == "eager"
        plain = model(pixels)
    torch.testing.assert_close(plain, fused, rtol=1e-4, atol=1e-5)
    model.set_attention("sdpa")
    assert model.attention_kernel == "sdpa"


def tokens_seen_by_the_first_block(model, pixels: torch.Tensor) -> int:
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[1]))
    try:
        model(pixels)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("fixture", ["tiny_hf_model", "tiny_timm_model"])
def test_patch_dropout_keeps_the_class_token_and_a_share_of_patches_while_training_only(fixture, request):
    model = load_model(str(request.getfixturevalue(fixture)), LABELS)
    pixels = torch.randn(2, 3, 32, 32)  # 4 x 4 patches of 8 px, and the class token
    model.set_patch_dropout(0.5)
    assert tokens_seen_by_the_first_block(model.train(), pixels) == 1 + 8
    assert tokens_seen_by_the_first_block(model.eval(), pixels) == 1 + 16
    model.set_patch_dropout(0.0)
    assert tokens_seen_by_the_first_block(model.train(), pixels) == 1 + 16


def test_patch_dropout_trains_on_fewer_tokens_validates_on_all_and_is_gone_after(cache, tiny_hf_model, tmp_path):
    model = load_model(str(tiny_hf_model), LABELS)
    seen = set()
    model.blocks[0].register_forward_pre_hook(lambda block, args: seen.add((block.training, args[0].shape[1])))
    result = fine_tune(model, load_split(cache, "train"), load_split(cache, "val"),
                       resolve(settings(patch_dropout=0.5, epochs=1), "full"), tmp_path, progress=False)
    assert result.settings["patch_dropout"] == 0.5 and seen == {(True, 1 + 8), (False, 1 + 16)}
    seen.clear()
    model.train()(torch.randn(2, 3, 32, 32))
    assert seen == {(True, 1 + 16)}


def test_fast_bf16_is_read_from_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not cpu_has_fast_bf16(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_fast_bf16(cpuinfo)
    assert not cpu_has_fast_bf16(tmp_path / "missing")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_an_unavailable_device_is_one_line_naming_the_setting():
    assert resolve_device("auto").type in ("cpu", "mps") and resolve_device("cpu").type == "cpu"
    with pytest.raises(VitflowError, match=r"^train.device=cuda: no CUDA device on this machine; set train.device"):
        resolve_device("cuda")


def test_loader_workers_default_to_none_on_a_cpu_and_some_beside_a_gpu():
    from vitflow.training.engine import loader_workers

    assert loader_workers(settings(loader_workers=None), torch.device("cpu")) == 0
    assert 1 <= loader_workers(settings(loader_workers=None), torch.device("cuda")) <= 4
    assert loader_workers(settings(loader_workers=3), torch.device("cpu")) == 3  # an explicit value is kept


def test_bf16_trains_under_autocast_and_saves_fp32_weights(cache, tiny_hf_model, tmp_path):
    model = load_model(str(tiny_hf_model), LABELS)
    result = fine_tune(model, load_split(cache, "train"), load_split(cache, "val"),
                       resolve(settings(precision="bf16", epochs=1), "full"), tmp_path, progress=False)
    assert (result.device, result.precision, result.attention) == ("cpu", "bf16", "eager")
    assert model.attention_kernel == "sdpa"  # trained with eager, handed back with its own
    saved = load_model(result.model_dir)
    assert {p.dtype for p in saved.parameters()} == {torch.float32}
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the trained model is plain fp32 again, outside any autocast
        torch.testing.assert_close(model.eval()(pixels), saved.eval()(pixels))


# --------------------------------------------------------------------------- best epoch, early stopping


@pytest.mark.parametrize("best_by, best_epoch", [("val_accuracy", 2), ("val_loss", 3)])
def test_early_stopping_saves_the_best_epoch(best_by, best_epoch, cache, tiny_hf_model, tmp_path, monkeypatch):
    scores = iter([(0.5, 0.9), (0.8, 0.7), (0.6, 0.5), (0.7, 0.6), (0.9, 0.65), (0.9, 0.4)])  # (accuracy, loss)
    snapshots = []

    def scripted_validate(model, val, batch_size, accelerator):
        snapshots.append(weights(model))
        accuracy, loss = next(scores)
        return {"val_loss": loss, "val_accuracy": accuracy}

    monkeypatch.setattr(loop, "validate", scripted_validate)
    model = load_model(str(tiny_hf_model), LABELS)
    result = fine_tune(model, load_split(cache, "train"), load_split(cache, "val"),
                       resolve(settings(epochs=6, early_stopping_patience=2, best_by=best_by), "full"), tmp_path,
                       progress=False)

    # two epochs without a better one: stop
    assert [row["epoch"] for row in result.history] == list(range(1, best_epoch + 3))
    assert result.best_epoch == best_epoch and result.stopped_early
    saved = load_model(result.model_dir).state_dict()
    assert all(torch.equal(saved[name], value) for name, value in snapshots[best_epoch - 1].items())
    assert not all(torch.equal(saved[name], value) for name, value in snapshots[-1].items())


# --------------------------------------------------------------------------- resume


class Killed(Exception):
    """Stands in for a kill: raised while epoch 3 validates, after epoch 2's checkpoint was written."""


@pytest.mark.parametrize("loader_workers", [0, 1])
def test_a_killed_training_resumes_from_its_last_epoch_to_the_same_weights(cache, tiny_hf_model, tmp_path,
                                                                          monkeypatch, loader_workers):
    model = ModelConfig(source=str(tiny_hf_model))
    resolved = resolve(settings(loader_workers=loader_workers), "full")
    whole = train_or_reuse(model, LABELS, None, cache, resolved, tmp_path / "whole" / "full", progress=False)

    real_validate, epochs_validated = loop.validate, []

    def killed_in_epoch_3(*args):
        epochs_validated.append(len(epochs_validated) + 1)
        if len(epochs_validated) == 3:
            raise Killed
        return real_validate(*args)

    monkeypatch.setattr(loop, "validate", killed_in_epoch_3)
    out_dir = tmp_path / "resumed" / "full"
    with pytest.raises(Killed):
        train_or_reuse(model, LABELS, None, cache, resolved, out_dir, progress=False)
    assert not out_dir.exists() and (out_dir.with_name(".full.partial") / "checkpoint" / "progress.json").is_file()

    steps = []
    monkeypatch.setattr(loop, "validate", real_validate)
    monkeypatch.setattr(torch.optim.AdamW, "step", counting(torch.optim.AdamW.step, steps))
    resumed = train_or_reuse(model, LABELS, None, cache, resolved, out_dir, progress=False)

    n_batches = -(-len(load_split(cache, "train").labels) // TRAIN.batch_size)
    assert len(steps) == n_batches  # only epoch 3 trained again
    assert resumed.history == whole.history
    expected = load_model(whole.model_dir).state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in load_model(resumed.model_dir).state_dict().items())
    assert not (out_dir / "checkpoint").exists() and not out_dir.with_name(".full.partial").exists()


def counting(step, calls: list):
    def wrapper(self, *args, **kwargs):
        calls.append(1)
        return step(self, *args, **kwargs)
    return wrapper


# --------------------------------------------------------------------------- gradient accumulation, lr groups


def test_gradient_accumulation_matches_the_larger_batch(cache, tiny_hf_model, tmp_path):
    train = load_split(cache, "train")
    train = SplitTensors(train.images[:32], train.labels[:32], train.paths[:32])
    val = load_split(cache, "val")
    trained = []
    for batch_size, accumulation in ((16, 1), (8, 2)):
        model = load_model(str(tiny_hf_model), LABELS)
        torch.manual_seed(0)
        model.head.reset_parameters()
        run = settings(batch_size=batch_size, grad_accumulation=accumulation, augment=False, epochs=2)
        fine_tune(model, train, val, resolve(run, "full"), tmp_path / str(batch_size), progress=False)
        trained.append(weights(model))
    for name, value in trained[0].items():
        torch.testing.assert_close(trained[1][name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_layer_decay_scales_the_backbone_learning_rate_per_block(tiny_hf_model):
    model = load_model(str(tiny_hf_model), LABELS)
    set_trainable(model, resolve(TRAIN, "full"))
    lr_of = {id(p): group["lr"] for group in parameter_groups(model, settings(layer_decay=0.5))
             for p in group["params"]}
    decay_of = {id(p): group["weight_decay"] for group in parameter_groups(model, TRAIN) for p in group["params"]}
    head, blocks, embeddings = model.head.weight, model.blocks, model.model.vit.embeddings
    assert lr_of[id(head)] == TRAIN.lr_head
    assert lr_of[id(model.final_norm.weight)] == TRAIN.lr_backbone
    assert lr_of[id(next(blocks[1].parameters()))] == TRAIN.lr_backbone * 0.5
    assert lr_of[id(next(blocks[0].parameters()))] == TRAIN.lr_backbone * 0.25
    assert lr_of[id(embeddings.patch_embeddings.projection.weight)] == TRAIN.lr_backbone * 0.125
    assert decay_of[id(head)] == TRAIN.weight_decay and decay_of[id(model.head.bias)] == 0.0
    assert len(lr_of) == sum(1 for _ in model.parameters())  # every trainable parameter is in one group


class Recorder(TrainingObserver):
    def __init__(self):
        self.steps, self.epochs = [], []

    def step(self, step, values):
        self.steps.append((step, values))

    def epoch(self, row):
        self.epochs.append(row)


@pytest.mark.parametrize("strategy", ["full", "feature_extraction"])
def test_an_observer_sees_every_step_and_epoch_as_they_happen(cache, tiny_hf_model, tmp_path, strategy):
    recorder = Recorder()
    model = load_model(str(tiny_hf_model), LABELS)
    result = fine_tune(model, load_split(cache, "train"), load_split(cache, "val"),
                       resolve(settings(epochs=2, grad_accumulation=2), strategy), tmp_path, progress=False,
                       observer=recorder)
    assert recorder.epochs == result.history
    n_train = len(load_split(cache, "train").labels)
    batches = -(-n_train // TRAIN.batch_size)
    updates = 2 * (-(-batches // 2) if strategy == "full" else batches)  # feature_extraction fits its head alone
    assert [step for step, _ in recorder.steps] == list(range(1, updates + 1))
    lr_head = [values["lr_head"] for _, values in recorder.steps]
    peak = lr_head.index(max(lr_head))
    assert max(lr_head) <= TRAIN.lr_head and lr_head[-1] < lr_head[peak]  # warm-up, then the cosine decay
    assert all(values["train_loss"] > 0 for _, values in recorder.steps)
    assert ("lr_backbone" in recorder.steps[0][1]) == (strategy == "full")


def test_strategies_share_one_read_of_the_pretrained_weights(tiny_hf_model, monkeypatch):
    reads = []
    real_load = loop.load_pretrained
    monkeypatch.setattr(loop, "load_pretrained", lambda *args: reads.append(args) or real_load(*args))
    model = ModelConfig(source=str(tiny_hf_model))
    first, second = (loop.pretrained_copy(model, tuple(LABELS), None, seed=7) for _ in range(2))
    assert len(reads) == 1
    loaded = second.state_dict()
    assert all(torch.equal(value, loaded[name]) for name, value in first.state_dict().items())
    with torch.no_grad():
        first.head.weight.add_(1.0)  # training one strategy's copy leaves the others as loaded
    assert not torch.equal(first.head.weight, second.head.weight)
    torch.manual_seed(7)  # the head is initialised as a fresh load with that seed would be
    assert torch.equal(second.head.weight, load_model(str(tiny_hf_model), LABELS).head.weight)
    loop.pretrained_copy(model, tuple(LABELS), None, seed=8)
    assert len(reads) == 2  # another seed: another head


def test_feature_extraction_on_a_distilled_deit_trains_both_heads_as_the_model_uses_them(cache, tiny_deit_distilled,
                                                                                          tmp_path):
    from vitflow.data.images import normalize

    model = load_model(str(tiny_deit_distilled), LABELS)
    val = load_split(cache, "val")
    result = fine_tune(model, load_split(cache, "train"), val,
                       resolve(settings(epochs=3, feature_extraction={"epochs": 3}), "feature_extraction"), tmp_path,
                       progress=False)
    assert result.trainable_params == sum(p.numel() for p in model.head.parameters())  # head and head_dist
    with torch.no_grad():  # the features the head trained on give the model's own predictions
        accuracy = (model.eval()(normalize(val.images, model.data_config)).argmax(1) == val.labels).float().mean()
    assert accuracy.item() == pytest.approx(result.history[result.best_epoch - 1]["val_accuracy"])


def test_a_daemonic_process_loads_batches_itself(monkeypatch):
    """Dask and multiprocessing workers are daemonic and may not start loader processes."""
    import multiprocessing

    from vitflow.data.cache import worker_processes

    assert worker_processes(2) == 2
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True, raising=False)
    assert worker_processes(2) == 0

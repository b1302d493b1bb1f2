"""Tests for vitflow.explain: rollout math on hand-built attention, and capture from tiny random ViTs."""

import numpy as np
import pytest
import timm
import torch
from matplotlib.figure import Figure
from PIL import Image
from transformers import (
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
)

from vitflow.explain.capture import capture_attentions
from vitflow.explain.figures import explanation_figure, save_figure, tile_title
from vitflow.explain.heatmaps import explain
from vitflow.explain.rollout import attention_rollout, cls_patch_map, fuse_heads, gradient_rollout


def random_attention(layers=3, batch=2, heads=2, tokens=5, seed=0):
    """Random softmaxed attention maps [B, H, N, N], one per layer."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, tokens, generator=gen).mul(2).softmax(-1) for _ in range(layers)]


def with_residual(a):
    """0.5*A + 0.5*I with rows renormalised, for a single [N, N] matrix."""
    a = 0.5 * a + 0.5 * torch.eye(a.shape[-1])
    return a / a.sum(-1, keepdim=True)


# --------------------------------------------------------------------------- math


def test_fuse_heads_modes():
    attn = torch.tensor([[0.2, 0.8], [0.6, 0.4]]).expand(1, 1, 2, 2)
    other = torch.tensor([[0.4, 0.6], [0.1, 0.9]]).expand(1, 1, 2, 2)
    both = torch.cat([attn, other], dim=1)
    torch.testing.assert_close(fuse_heads(both, "mean")[0], torch.tensor([[0.3, 0.7], [0.35, 0.65]]))
    torch.testing.assert_close(fuse_heads(both, "max")[0], torch.tensor([[0.4, 0.8], [0.6, 0.9]]))
    torch.testing.assert_close(fuse_heads(both, "min")[0], torch.tensor([[0.2, 0.6], [0.1, 0.4]]))
    with pytest.raises(ValueError, match="head fusion"):
        fuse_heads(both, "median")


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.5, 0.9])
def test_rows_sum_to_one(fusion, discard):
    rollout = attention_rollout(random_attention(tokens=7), fusion, discard)
    assert rollout.shape == (2, 7, 7)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 7))
    assert (rollout >= 0).all()


def test_uniform_attention_closed_form_and_constant_map():
    layers, n = 3, 5
    uniform = [torch.full((1, 2, n, n), 1.0 / n) for _ in range(layers)]
    rollout = attention_rollout(uniform)
    expected = 0.5**layers + (1 - 0.5**layers) / n
    assert rollout[0, 0, 0].item() == pytest.approx(expected, abs=1e-6)
    patch_map = cls_patch_map(rollout, grid=(2, 2), num_prefix_tokens=1)
    torch.testing.assert_close(patch_map, torch.ones(1, 2, 2))


def test_identity_attention_gives_identity_and_no_nan():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    rollout = attention_rollout([eye, eye, eye])
    assert torch.equal(rollout, torch.eye(5).expand(2, 5, 5))
    patch_map = cls_patch_map(rollout, grid=(2, 2), num_prefix_tokens=1)
    assert not patch_map.isnan().any()
    assert torch.equal(patch_map, torch.zeros(2, 2, 2))


def test_single_layer_is_half_attention_plus_half_identity():
    attn = random_attention(layers=1, heads=1)[0]
    rollout = attention_rollout([attn])
    torch.testing.assert_close(rollout, 0.5 * attn[:, 0] + 0.5 * torch.eye(5))


def test_multiplication_order_is_last_layer_first():
    a1 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    a2 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    h1, h2 = with_residual(a1), with_residual(a2)
    assert not torch.allclose(h2 @ h1, h1 @ h2)
    rollout = attention_rollout([a1[None, None], a2[None, None]])[0]
    torch.testing.assert_close(rollout, h2 @ h1)
    assert not torch.allclose(rollout, h1 @ h2)


def test_discard_never_zeroes_cls_to_cls():
    attn = (torch.arange(1.0, 17.0) / 100).reshape(1, 1, 4, 4)  # distinct entries, CLS->CLS the smallest
    attn[0, 0, 0, 1] = 1.0  # the largest entry
    # 0.9 * 16 = 14 entries go: all but CLS->CLS and the largest one.
    rollout = attention_rollout([attn], discard_ratio=0.9)[0]
    expected = torch.eye(4)
    expected[0, :2] = torch.tensor([0.5 * 0.01 + 0.5, 0.5 * 1.0]) / (0.5 * 0.01 + 0.5 + 0.5 * 1.0)
    torch.testing.assert_close(rollout, expected)


def test_batch_equals_single_runs():
    attentions = random_attention(batch=3, tokens=6)
    batched = attention_rollout(attentions, "max", 0.5)
    singles = [attention_rollout([a[i : i + 1] for a in attentions], "max", 0.5) for i in range(3)]
    torch.testing.assert_close(batched, torch.cat(singles))


def test_argument_validation():
    attentions = random_attention()
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(attentions, "median")
    with pytest.raises(ValueError, match="discard_ratio"):
        attention_rollout(attentions, discard_ratio=1.0)
    with pytest.raises(ValueError, match="empty"):
        attention_rollout([])
    with pytest.raises(ValueError, match="layer 1"):
        attention_rollout([attentions[0], attentions[1][:, :1]])
    with pytest.raises(ValueError, match="gradient"):
        gradient_rollout(attentions, attentions[:2])


def test_gradient_rollout_with_unit_gradients_equals_attention_rollout():
    attentions = random_attention(heads=1)
    ones = [torch.ones_like(a) for a in attentions]
    for discard in (0.0, 0.5):
        torch.testing.assert_close(
            gradient_rollout(attentions, ones, discard), attention_rollout(attentions, "mean", discard)
        )


def test_gradient_rollout_clamps_negatives_before_fusing_heads():
    attentions = random_attention(layers=2, heads=1)
    negative = [-torch.ones_like(a) for a in attentions]
    rollout = gradient_rollout(attentions, negative)
    assert not rollout.isnan().any()
    torch.testing.assert_close(rollout, torch.eye(5).expand(2, 5, 5))

    # Head 0 has A*grad = +A, head 1 has -A: clamping first leaves A/2, fusing first would give 0.
    attn = random_attention(layers=1, heads=1)[0].expand(2, 2, 5, 5)
    grad = torch.stack([torch.ones(2, 5, 5), -torch.ones(2, 5, 5)], dim=1)
    expected = attention_rollout([0.5 * attn[:, :1]])
    torch.testing.assert_close(gradient_rollout([attn], [grad]), expected)


def test_gradient_rollout_zero_rows_do_not_produce_nan():
    attn = random_attention(layers=1, heads=2)[0]
    grad = torch.ones_like(attn)
    grad[:, :, 2] = -1.0  # row 2 is all negative -> all zero after the clamp
    rollout = gradient_rollout([attn], [grad])
    assert not rollout.isnan().any()
    torch.testing.assert_close(rollout[:, 2], torch.eye(5)[2].expand(2, 5))
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 5))


def test_cls_patch_map_reads_cls_row_over_patches_only():
    # 1 CLS + 2 register tokens + a 2x3 grid.
    rollout = torch.zeros(1, 9, 9)
    rollout[0, 0] = torch.tensor([9.0, 9.0, 9.0, 1, 2, 3, 4, 5, 6])
    rollout[0, 1] = torch.tensor([0.0, 0, 0, 6, 5, 4, 3, 2, 1])
    patch_map = cls_patch_map(rollout, grid=(2, 3), num_prefix_tokens=3)
    torch.testing.assert_close(patch_map[0], torch.tensor([[1.0, 2, 3], [4, 5, 6]]) / 6)

    distilled = cls_patch_map(rollout, grid=(2, 3), num_prefix_tokens=3, distilled=True)
    torch.testing.assert_close(distilled[0], torch.ones(2, 3))

    with pytest.raises(ValueError, match="patch grid"):
        cls_patch_map(rollout, grid=(2, 2), num_prefix_tokens=3)
    with pytest.raises(ValueError, match="distilled"):
        cls_patch_map(rollout[:, 2:, 2:], grid=(2, 3), num_prefix_tokens=1, distilled=True)


# --------------------------------------------------------------------------- capture from real models

TINY_HF = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    num_labels=3,
    hidden_dropout_prob=0.2,
    attention_probs_dropout_prob=0.2,
)
TINY_TIMM = dict(
    pretrained=False,
    img_size=32,
    patch_size=8,
    depth=2,
    num_heads=2,
    embed_dim=32,
    num_classes=3,
    drop_rate=0.2,
    attn_drop_rate=0.2,
)


def hf_vit():
    return ViTForImageClassification(ViTConfig(**TINY_HF))


def hf_deit():
    return DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY_HF))


def hf_dinov2_registers():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Dinov2WithRegistersForImageClassification"):
        pytest.skip("this transformers has no Dinov2WithRegisters")
    config = {k: v for k, v in TINY_HF.items() if k != "intermediate_size"}
    return transformers.Dinov2WithRegistersForImageClassification(
        transformers.Dinov2WithRegistersConfig(**config, mlp_ratio=2, num_register_tokens=3)
    )


def timm_vit():
    return timm.create_model("vit_tiny_patch16_224", **TINY_TIMM)


def timm_vit_registers_dynamic():
    return timm.create_model("vit_tiny_patch16_224", **TINY_TIMM, reg_tokens=2, dynamic_img_size=True)


def timm_deit_distilled():
    return timm.create_model("deit_tiny_distilled_patch16_224", **TINY_TIMM)


# factory, input size (H, W), expected grid, prefix tokens, distilled
CASES = {
    "hf_vit": (hf_vit, (32, 32), (4, 4), 1, False),
    "hf_deit_teacher": (hf_deit, (32, 32), (4, 4), 2, True),
    "hf_dinov2_registers_interpolated": (hf_dinov2_registers, (48, 40), (6, 5), 4, False),
    "timm_vit": (timm_vit, (32, 32), (4, 4), 1, False),
    "timm_vit_registers_dynamic": (timm_vit_registers_dynamic, (48, 40), (6, 5), 3, False),
    "timm_deit_distilled": (timm_deit_distilled, (32, 32), (4, 4), 2, True),
}


def fast_attention_state(model):
    """What the explanation pass must leave untouched: attention implementation / fused flags."""
    if hasattr(model, "config"):
        return model.config._attn_implementation
    return [block.attn.fused_attn for block in model.blocks]


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    factory, size, grid, prefix, distilled = CASES[request.param]
    torch.manual_seed(0)
    model = factory()
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    return model, pixels, grid, prefix, distilled


def test_capture_one_softmaxed_map_per_layer_and_restores_state(case):
    model, pixels, grid, prefix, distilled = case
    before = fast_attention_state(model)
    assert before in ("sdpa", [True, True]), "the test needs the fast attention path to start from"
    model.eval()
    with torch.no_grad():
        fast_logits = model(pixels)
    fast_logits = getattr(fast_logits, "logits", fast_logits)

    model.train()
    head = list(model.modules())[-1]
    head.eval()  # a mixed state that must come back as it was; the dropout layers stay in training mode
    captured = capture_attentions(model, pixels)

    assert model.training and not head.training
    assert fast_attention_state(model) == before
    assert (captured.grid, captured.num_prefix_tokens, captured.distilled) == (grid, prefix, distilled)
    assert captured.gradients is None
    assert len(captured.attentions) == 2
    tokens = prefix + grid[0] * grid[1]
    for attn in captured.attentions:
        assert attn.shape == (2, 2, tokens, tokens)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, tokens))
    torch.testing.assert_close(captured.logits, fast_logits, atol=1e-5, rtol=1e-5)


def test_capture_gradients_of_target_class(case):
    model, pixels, *_ = case
    for p in model.parameters():
        p.requires_grad_(False)  # frozen backbone: gradients must still reach the attention maps
    captured = capture_attentions(model, pixels, target_class=1)
    assert len(captured.gradients) == len(captured.attentions)
    for attn, grad in zip(captured.attentions, captured.gradients, strict=True):
        assert grad.shape == attn.shape
        assert grad.abs().sum() > 0
    assert not captured.logits.requires_grad


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_explain_maps(case, fusion):
    model, pixels, grid, *_ = case
    maps, logits = explain(model, pixels, head_fusion=fusion, discard_ratio=0.5)
    assert maps.shape == (2, *grid)
    assert logits.shape == (2, 3)
    assert not maps.isnan().any()
    assert maps.min() >= 0 and maps.amax(dim=(1, 2)).tolist() == pytest.approx([1.0, 1.0])


def test_explain_with_target_class(case):
    model, pixels, grid, *_ = case
    maps, _ = explain(model, pixels, target_class=2)
    assert maps.shape == (2, *grid)
    assert not maps.isnan().any()
    assert ((maps >= 0) & (maps <= 1)).all()
    with pytest.raises(ValueError, match="mean"):
        explain(model, pixels, head_fusion="max", target_class=2)
    with pytest.raises(ValueError, match="out of range"):
        explain(model, pixels, target_class=3)


def test_capture_rejects_other_models():
    with pytest.raises(TypeError):
        capture_attentions(torch.nn.Linear(3, 3), torch.zeros(1, 3, 8, 8))


def test_gradient_rollout_is_class_specific_and_differs_from_plain():
    torch.manual_seed(0)
    model = hf_vit()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain, _ = explain(model, pixels)
    for_class = [explain(model, pixels, target_class=target)[0] for target in (0, 1)]
    assert not torch.allclose(for_class[0], for_class[1], atol=1e-3)
    assert not torch.allclose(for_class[0], plain, atol=1e-3)
    per_image, _ = explain(model, pixels, target_class=torch.tensor([0, 1]))  # one class per image in a batch
    torch.testing.assert_close(per_image, torch.stack([for_class[0][0], for_class[1][1]]))


# --------------------------------------------------------------------------- drawing


def tile_parts(panel):
    """(original, overlay, colour bar) axes of one tile, told apart by what they hold."""
    colour_bars = [ax for ax in panel.axes if ax.get_label() == "<colorbar>"]
    pictures = [ax for ax in panel.axes if ax.get_label() != "<colorbar>"]
    assert len(colour_bars) == 1 and len(pictures) == 2
    original, overlay = sorted(pictures, key=lambda ax: len(ax.images))
    return original, overlay, colour_bars[0]


def test_each_tile_shows_the_image_beside_its_overlay_and_a_colour_bar(tmp_path):
    image = Image.new("RGB", (32, 24), (128, 128, 128))
    patch_map = np.random.default_rng(0).random((3, 4))
    items = [dict(image=image, map=patch_map, title=tile_title("cat", "dog", 0.9312)) for _ in range(5)]
    fig = explanation_figure(items, title="gradient rollout", cols=2)

    assert isinstance(fig, Figure) and [text.get_text() for text in fig.texts] == ["gradient rollout"]
    panels = fig.subfigs
    assert len(panels) == 6  # 3 rows of 2; the last is left empty
    for panel in panels[:5]:
        original, overlay, colour_bar = tile_parts(panel)
        assert [text.get_text() for text in panel.texts] == ["true: cat / pred: dog (p=0.93)"]
        assert len(original.images) == 1
        np.testing.assert_array_equal(original.images[0].get_array(), np.asarray(image))
        picture, heat = overlay.images
        np.testing.assert_array_equal(picture.get_array(), np.asarray(image))
        np.testing.assert_allclose(heat.get_array(), patch_map)
        assert heat.get_extent() == [0, 32, 24, 0]  # stretched over the whole image
        assert heat.get_alpha() == 0.5 and heat.get_clim() == (0, 1)
        assert colour_bar.get_ylim() == (0, 1) and "attribution" in colour_bar.get_ylabel()
    assert not panels[5].axes

    path = save_figure(fig, tmp_path / "out" / "grid.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (1280, 1060)
    with pytest.raises(ValueError):
        explanation_figure([])

"""The deletion metric (vitflow.explain.faithfulness) on a model whose answer is known: it reads one patch only."""

import pytest
import torch
from torch import nn

from vitflow.explain.faithfulness import area_under_curve, deletion_curve, deletion_scores

GRID, PATCH, KEY = (4, 4), 8, (1, 2)  # a 4x4 grid of 8-pixel patches; the model reads patch (1, 2) alone
CONFIDENT, GREYED = torch.sigmoid(torch.tensor(5.0)).item(), torch.sigmoid(torch.tensor(-5.0)).item()


class OnePatchModel(nn.Module):
    """Two logits: 10 * (mean of patch KEY - 0.5) and 0. With that patch at 1 class 0 has p = sigmoid(5);
    greyed out (0) it has p = sigmoid(-5). No other pixel matters."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        row, col = KEY
        value = pixels[:, :, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH].mean(dim=(1, 2, 3))
        return torch.stack([10 * (value - 0.5), torch.zeros_like(value)], dim=1)


def key_first_map(batch: int) -> torch.Tensor:
    """Attribution maps [B, 4, 4] that rank patch KEY first and all others below it, in distinct order."""
    maps = torch.linspace(0, 0.9, GRID[0] * GRID[1]).reshape(1, *GRID).repeat(batch, 1, 1)
    maps[:, KEY[0], KEY[1]] = 1.0
    return maps


@pytest.fixture
def images():
    return torch.ones(4, 3, GRID[0] * PATCH, GRID[1] * PATCH), torch.zeros(4, dtype=torch.long)


def test_deletion_curve_follows_the_one_patch_that_matters(images):
    pixels, targets = images
    maps = key_first_map(4)
    first = deletion_curve(OnePatchModel(), pixels, maps, targets, steps=16)
    assert first.shape == (4, 17)
    torch.testing.assert_close(first[:, 0], torch.full((4,), CONFIDENT))
    torch.testing.assert_close(first[:, 1:], torch.full((4, 16), GREYED))  # gone at the first step

    last = deletion_curve(OnePatchModel(), pixels, -maps, targets, steps=16)
    torch.testing.assert_close(last[:, :16], torch.full((4, 16), CONFIDENT))  # deleted only at the very end
    torch.testing.assert_close(last[:, 16], torch.full((4,), GREYED))

    # 4 steps over 16 patches: 4 patches a step, the key patch (rank 0) in the first one.
    torch.testing.assert_close(deletion_curve(OnePatchModel(), pixels, maps, targets, steps=4)[0],
                               torch.tensor([CONFIDENT] + [GREYED] * 4))


def test_deletion_auc_is_lowest_for_the_right_ranking_and_random_lies_between(images):
    pixels, targets = images
    maps = key_first_map(4)
    lowest = (0.5 * (CONFIDENT + GREYED) + 15 * GREYED) / 16  # the key patch deleted in the first of 16 steps
    highest = (15 * CONFIDENT + 0.5 * (CONFIDENT + GREYED)) / 16  # ... in the last

    scores = deletion_scores(OnePatchModel(), pixels, maps, targets, steps=16, random_orders=20, seed=0)
    assert scores["deletion_auc"] == pytest.approx(lowest, abs=1e-6) and lowest < 0.04
    assert 0.35 < scores["deletion_auc_random"] < 0.65  # expected 0.5: the key patch goes at a uniform step
    assert scores["deletion_auc_gap"] == pytest.approx(scores["deletion_auc_random"] - lowest)
    assert scores["deletion_auc_gap"] > 0.3

    reversed_auc = area_under_curve(deletion_curve(OnePatchModel(), pixels, -maps, targets, steps=16))
    torch.testing.assert_close(reversed_auc, torch.full((4,), highest))
    assert highest > 0.95

    again = deletion_scores(OnePatchModel(), pixels, maps, targets, steps=16, random_orders=20, seed=0)
    assert again == scores  # the random orders are seeded


def test_area_under_curve_spans_zero_to_one():
    torch.testing.assert_close(area_under_curve(torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])),
                               torch.tensor([1.0, 0.25]))


def test_maps_must_tile_the_image(images):
    pixels, targets = images
    with pytest.raises(ValueError, match="tile"):
        deletion_curve(OnePatchModel(), pixels, torch.rand(4, 3, 5), targets)

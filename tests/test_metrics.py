import numpy as np
import pytest
import torch

from utils.metrics import game, mae, rmse


def test_mae_rmse_match_definitions():
    pred, gt = [10.0, 0.0, 5.0], [7.0, 4.0, 5.0]
    assert mae(pred, gt) == pytest.approx((3 + 4 + 0) / 3)
    assert rmse(pred, gt) == pytest.approx(np.sqrt((9 + 16 + 0) / 3))


def _game_by_regions(pred: np.ndarray, gt: np.ndarray, level: int) -> float:
    """Reference: explicit loops over the 4^L regions with boundaries floor(i * n / cells)."""
    cells, (h, w) = 2**level, pred.shape
    err = 0.0
    for i in range(cells):
        for j in range(cells):
            r = slice(i * h // cells, (i + 1) * h // cells)
            c = slice(j * w // cells, (j + 1) * w // cells)
            err += abs(pred[r, c].sum() - gt[r, c].sum())
    return err


@pytest.mark.parametrize("shape", [(16, 16), (13, 29), (5, 7)])
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_game_matches_region_loop(shape, level):
    rng = np.random.default_rng(level)
    pred, gt = rng.random(shape), rng.random(shape)
    expected = _game_by_regions(pred, gt, level)
    assert game(torch.from_numpy(pred), torch.from_numpy(gt), level) == pytest.approx(expected, rel=1e-9)


def test_game0_is_absolute_count_error_and_grows_with_level():
    pred = torch.zeros(8, 8)
    gt = torch.zeros(8, 8)
    pred[0, 0], gt[7, 7] = 3.0, 3.0  # right count, wrong place
    assert game(pred, gt, 0) == pytest.approx(0.0)
    assert game(pred, gt, 1) == pytest.approx(6.0)

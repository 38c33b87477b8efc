import numpy as np
import pytest
import torch

from utils.metrics import game, mae, rmse, summarize


def test_mae_rmse_match_definitions():
    pred, gt = [10.0, 0.0, 5.0], [7.0, 4.0, 5.0]
    assert mae(pred, gt) == pytest.approx((3 + 4 + 0) / 3)
    assert rmse(pred, gt) == pytest.approx(np.sqrt((9 + 16 + 0) / 3))


def test_summary_names_the_root_mean_square_rmse():
    """What papers call "MSE" is a root mean square: it is written as `rmse`, and no key says `mse`."""
    summary = summarize([10.0, 0.0, 5.0], [7.0, 4.0, 5.0])
    assert summary == {"mae": pytest.approx(7 / 3), "rmse": pytest.approx(np.sqrt(25 / 3))}


def test_certificate_summary_names_its_root_mean_squares_rmse():
    from utils.certify import summarize_certificates

    rows = [{"gt": 10.0, "count": 11.0, "L4": 7.0, "U4": 12.0}, {"gt": 20.0, "count": 20.0, "L4": 19.0, "U4": 24.0}]
    side = summarize_certificates(rows, [4])["patch_sizes"]["4"]
    assert side["tight_mae"] == pytest.approx((3 + 4) / 2) and side["tight_rmse"] == pytest.approx(np.sqrt(25 / 2))
    assert side["rmse"] == pytest.approx(np.sqrt(1 / 2))
    assert not [k for k in side if k.endswith("mse") and not k.endswith("rmse")]


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


def test_errors_by_ground_truth_count_partition_the_images():
    from utils.metrics import by_count

    gt = [10, 49, 50, 120, 450, 800]
    pred = [12, 45, 50, 100, 400, 700]
    bins = by_count(pred, gt)
    assert [(b["gt_from"], b["gt_below"], b["images"]) for b in bins] == [
        (0, 50, 2), (50, 100, 1), (100, 200, 1), (400, None, 2)]  # 200-400 holds no image: left out
    assert bins[0]["mae"] == 3.0 and bins[0]["bias"] == -1.0
    assert bins[-1]["bias"] == -75.0 and sum(b["images"] for b in bins) == len(gt)
    total = sum(b["mae"] * b["images"] for b in bins) / len(gt)  # the bins' MAEs recombine into the MAE
    assert abs(total - sum(abs(p - g) for p, g in zip(pred, gt, strict=True)) / len(gt)) < 1e-12

import pytest
import torch
from scipy.stats import chi2

from utils.ablation import ablate, sample_indices, units_per_image
from utils.errors import ToolkitError


@pytest.mark.parametrize("unit", ["element", "pixel"])
def test_each_image_keeps_exactly_keep_units_and_fills_the_rest(unit):
    x = torch.rand(5, 3, 12, 10) * 0.5 + 0.5  # never equal to the fill
    out = ablate(x, keep=37, unit=unit, fill=0.1307, generator=torch.Generator().manual_seed(0))
    kept = out != 0.1307
    if unit == "pixel":
        assert torch.equal(kept.all(1), kept.any(1))  # channels of a pixel go together
        kept = kept.all(1)
    assert kept.flatten(1).sum(1).tolist() == [37] * 5
    assert torch.equal(out[out != 0.1307], x[out != 0.1307])
    assert not torch.equal(kept[0], kept[1])  # independent per image


@pytest.mark.parametrize("keep", [5, 12])  # few (draw and redraw repeats) and many (top-k of random keys)
def test_indices_are_distinct_and_uniform(keep):
    d, draws = 20, 4000
    idx = sample_indices(d, keep, draws, torch.Generator().manual_seed(1))
    assert all(len(set(row)) == keep for row in idx.tolist())
    counts = torch.bincount(idx.flatten(), minlength=d).double()
    expected = draws * keep / d
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert statistic < chi2.ppf(0.999, d - 1)  # each index is kept with probability keep / d
    kept = torch.zeros(draws, d).scatter_(1, idx, 1.0)
    together = (kept.T @ kept)[tuple(torch.triu_indices(d, d, 1))]  # how often each pair is kept jointly
    expected = draws * keep * (keep - 1) / (d * (d - 1))
    # not independent cells, so no exact chi-square law: a loose bound that a biased sampler still breaks
    assert float(((together - expected) ** 2 / expected).sum()) < 1.5 * chi2.ppf(0.999, len(together) - 1)


def test_gradient_flows_to_kept_values_only():
    x = torch.rand(1, 3, 4, 4, requires_grad=True)
    ablate(x, keep=7, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad.sum().item() == 7 and set(x.grad.unique().tolist()) <= {0.0, 1.0}


def test_bad_keep_and_unit():
    x = torch.rand(1, 3, 4, 4)
    for keep in (0, -1, 49):
        with pytest.raises(ToolkitError, match="keep must lie in 1..48"):
            ablate(x, keep)
    with pytest.raises(ToolkitError, match="keep must lie in 1..16"):
        ablate(x, 17, unit="pixel")
    with pytest.raises(ToolkitError, match="unknown ablation unit"):
        units_per_image(x.shape, "patch")

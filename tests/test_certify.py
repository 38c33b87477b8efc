import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import binom, norm

from utils.certify import (
    bound_table,
    certified_interval,
    delta,
    inside_probability,
    miss_probability,
    order_statistic_indices,
)
from utils.errors import ToolkitError


@pytest.mark.parametrize("d,rho,k", [(10, 3, 2), (50, 7, 5), (200, 40, 30), (1000, 1, 999), (30, 30, 1), (8, 0, 8)])
def test_delta_equals_exact_rational_arithmetic(d, rho, k):
    exact = 1 - Fraction(math.comb(d - rho, k), math.comb(d, k))
    assert delta(d, rho, k) == pytest.approx(float(exact), abs=1e-12)
    assert inside_probability(d, rho, k) == pytest.approx(math.comb(rho, k) / math.comb(d, k), abs=1e-12)


def test_delta_is_finite_and_monotone_for_huge_d():
    d = 10**8
    values = [delta(d, rho, 45) for rho in (0, 10, 10**3, 10**5, 10**7, d)]
    assert all(math.isfinite(v) for v in values)
    assert values == sorted(values) and values[0] == 0 and values[-1] == 1
    assert [delta(d, 3000, k) for k in (1, 10, 100)] == sorted(delta(d, 3000, k) for k in (1, 10, 100))


def test_paper_bound_table():
    rows = bound_table(2150400, 45, [20, 40, 81, 163])
    assert [round(r["upper"], 4) for r in rows] == [0.9752, 0.9043, 0.6611, 0.1827]
    assert rows[0]["lower"] == pytest.approx(1.7e-147, rel=0.05)
    assert rows[3]["lower"] == pytest.approx(4.0e-65, rel=0.05)


def test_order_statistics_follow_their_definition():
    lower, u = order_statistic_indices(1000, 0.05, 0.05)
    assert binom.cdf(lower - 1, 1000, 0.45) <= 0.025 < binom.cdf(lower, 1000, 0.45)
    assert binom.cdf(u - 1, 1000, 0.55) >= 0.975 > binom.cdf(u - 2, 1000, 0.55)
    assert order_statistic_indices(1000, 0.5, 0.05) is None  # Δ ≥ 0.5: nothing certified
    assert math.isnan(certified_interval(np.arange(10.0), 0.3, 0.05)[0])  # too few samples


def test_interval_covers_the_attacked_median_of_a_known_toy():
    """Clean ablated counts ~ N(100, 10); an attacker moves a Δ share of the mass to ±∞, the worst it can do
    within total variation Δ. The attacked medians are then known; they must lie in [L, U] in ≥ 1 − α of trials."""
    rng = np.random.default_rng(0)
    n, alpha, trials, d_ = 500, 0.05, 1000, 0.08
    up = 100 + 10 * norm.ppf(0.5 / (1 - d_))  # median with Δ mass at +∞
    down = 100 + 10 * norm.ppf(1 - 0.5 / (1 - d_))  # median with Δ mass at −∞
    covered = 0
    for _ in range(trials):
        lo, hi = certified_interval(rng.normal(100, 10, n), d_, alpha)
        covered += lo <= down and up <= hi
    assert covered / trials >= 1 - alpha - 0.01


def test_bad_arguments():
    with pytest.raises(ToolkitError, match="keep must lie"):
        delta(100, 10, 0)
    with pytest.raises(ToolkitError, match="keep must lie"):
        miss_probability(100, 10, 101)
    with pytest.raises(ToolkitError, match="does not fit"):
        delta(100, 101, 5)
    for alpha in (0, 1, 1.5):
        with pytest.raises(ToolkitError, match="alpha must lie"):
            order_statistic_indices(100, 0.1, alpha)
    with pytest.raises(ToolkitError, match="at least 1"):
        order_statistic_indices(0, 0.1, 0.05)


def test_apam_against_the_smoothed_model_stays_inside_the_certificate(tiny_mcnn, tiny_crowds):
    """End to end: patches optimised through the ablation (expectation over ablations) to push the count up, or
    down, never move the attacked median count outside the clean image's certified interval for their size."""
    import torch

    from datasets.crowd import CrowdDataset
    from models import build
    from utils.ablation import AblationSpec
    from utils.attack import APAM, APAMConfig
    from utils.patch import PatchSpec, PatchTransform, random_patch, sample_centers

    keep, side, samples, alpha = 45, 8, 100, 0.05
    model = build("mcnn", tiny_mcnn).eval()  # any base model: the certificate does not assume training
    images = torch.stack([img for img, _, _ in CrowdDataset.for_model(tiny_crowds / "test_data", model)])
    gen = torch.Generator().manual_seed(0)
    spec = AblationSpec(keep)
    with torch.no_grad():
        clean = [spec.counts(model, image, samples, generator=gen).numpy() for image in images]
    assert all(ys.std() > 0 for ys in clean)  # the ablated counts vary, so there is something to bound

    def smoothed_model(x: torch.Tensor) -> torch.Tensor:  # 4 ablations per image, the attack's expectation
        return model(spec.ablate(x.repeat_interleave(4, dim=0), gen))

    for objective in ("maximize", "minimize"):
        config = APAMConfig(target=objective, lr=0.05)
        patch_spec = PatchSpec(side, "square", PatchTransform.none())
        attack = APAM(smoothed_model, random_patch(side, gen), patch_spec, config, gen, amp=False)
        attack.fit(lambda _: [(images, None)], epochs=6)
        centers = sample_centers(len(images), *images.shape[-2:], side, "center")
        patched, _ = patch_spec.paste(images, attack.patch, centers)
        # ρ: the units the patch really changed (bilinear resampling may touch a rim beyond the s×s square)
        changed = int((patched != images).any(dim=1).sum(dim=(1, 2)).max())
        assert side * side <= changed <= (side + 2) ** 2
        d, rho = images[0].numel(), 3 * changed
        for before, attacked in zip(clean, patched, strict=True):
            with torch.no_grad():
                after = spec.counts(model, attacked, samples, generator=gen).numpy()
            lo, hi = certified_interval(before, delta(d, rho, keep), alpha)
            assert lo <= np.median(after) <= hi, (objective, lo, np.median(after), hi)


def test_most_heads_in_square_is_the_brute_force_maximum():
    from utils.certify import most_heads_in_square

    rng = np.random.default_rng(0)
    points = rng.uniform(0, [30, 20], size=(60, 2))
    points[:5] = [[29.99, 19.99], [0, 0], [12.5, 7.5], [12.9, 7.1], [13.0, 7.0]]  # edges and shared pixels
    cols, rows = points[:, 0].astype(int), points[:, 1].astype(int)
    for side in (1, 3, 7, 25):
        best = max(int(((rows >= r) & (rows < r + side) & (cols >= c) & (cols < c + side)).sum())
                   for r in range(max(20 - side, 0) + 1) for c in range(max(30 - side, 0) + 1))
        assert most_heads_in_square(points, (20, 30), side) == best

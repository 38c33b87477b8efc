"""Receptive-field certificates are sound: no patch content, placement or optimised attack, and no values written
into the cells a patch can reach, ever takes the certified counter outside [L, U]."""
import dataclasses
import itertools
import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from models import build
from models.receptive_field import ReceptiveField, receptive_field
from utils.attack import APAM, APAMConfig
from utils.errors import ToolkitError
from utils.patch import PatchSpec, PatchTransform, random_patch, sweep_centers
from utils.rf_certify import (
    FLOAT_TOLERANCE,
    Calibration,
    RFClipCertifier,
    RFMaskCertifier,
    calibrate,
    densest_pair,
    fit_refill,
    window_sums,
)

TOL = 1e-6  # float32 densities, float64 sums


@pytest.fixture(params=["tiny", "mcnn", "smallfield"])
def model(request, tiny_counter):
    """A tiny dilated counter, MCNN (seed 1: the original init leaves its output alive), and SmallField."""
    return tiny_counter("dilated") if request.param == "tiny" else build(request.param, seed=1).eval()


def _certifiers(model, images, sides) -> list:
    rf = receptive_field(model)
    with torch.no_grad():
        clean = model(images).clamp_min(0)
    dmax = float(clean.quantile(0.9))  # low on purpose: clipping must bite
    calibration = Calibration(dmax, {s: 0.5 * float(clean.sum()) / len(images) for s in sides})
    fitted = [dataclasses.replace(calibration, slope={s: a for s in sides}, refill="fitted") for a in (1.7, 0.3)]
    return [RFClipCertifier(rf, calibration), RFMaskCertifier(rf, calibration),
            *(RFMaskCertifier(rf, f) for f in fitted)]  # rf-mask with a constant refill, and fitted slopes


def _inside(certifier, model, clean: torch.Tensor, attacked: torch.Tensor, side: int) -> None:
    """Every attacked image's count lies in its clean image's certified interval."""
    bounds = certifier.certify_batch(model, clean, [side])
    counts = certifier.counts(model, attacked, side).view(-1, len(clean))
    for per_image in counts:
        for b, count in zip(bounds, per_image.tolist(), strict=True):
            assert b[f"L{side}"] - TOL * (1 + abs(count)) <= count <= b[f"U{side}"] + TOL * (1 + abs(count)), \
                (certifier.method, side, b[f"L{side}"], count, b[f"U{side}"])


def test_random_patches_at_every_grid_placement_stay_inside(model):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 96, 128, generator=gen)
    with torch.no_grad():
        for shape, side in (("circle", 9), ("square", 20)):
            spec = PatchSpec(side, shape, PatchTransform())
            cover = spec.footprint_side
            certifiers = _certifiers(model, images, [cover])
            grid = sweep_centers(96, 128, side, 5)  # 25 placements, off the pixel grid after the random scale
            batch = images.repeat(len(grid), 1, 1, 1)
            clean = model(batch)
            for patch in (random_patch(side, gen), torch.ones(3, side, side)):
                attacked, _ = spec.paste(batch, patch, grid.repeat_interleave(len(images), dim=0), gen)
                density = model(attacked)
                for certifier in certifiers:
                    _inside(certifier, lambda x, d=density, a=attacked: d if x is a else model(x), images, attacked,
                            cover)
                # the cells that changed fit in one window of the size the certificates assume
                w = certifiers[0].rf.window(cover)
                for mask in (density - clean).abs().sum(1) > 0:
                    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
                    assert len(rows) and rows[-1] - rows[0] < w and cols[-1] - cols[0] < w


def test_apam_against_the_certified_counter_itself_stays_inside(model):
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 96, 128, generator=gen)  # MCNN's map (24×32) wider than its 21-cell window
    spec = PatchSpec(12, "circle", PatchTransform(), placement="random")
    cover = spec.footprint_side
    moved = []
    for certifier in _certifiers(model, images, [cover]):
        for objective in ("maximize", "minimize"):
            attack = APAM(lambda x, c=certifier: c.density(model, x, cover), random_patch(12, gen), spec,
                          APAMConfig(target=objective, lr=0.1), gen, amp=False)
            before = float(certifier.counts(model, spec.apply(images, attack.patch, gen)[0], cover).sum())
            attack.fit(lambda _: [(images, None)], epochs=6)
            with torch.no_grad():
                grid = sweep_centers(96, 128, 12, 3)
                attacked, _ = spec.paste(images.repeat(len(grid), 1, 1, 1), attack.patch,
                                         grid.repeat_interleave(len(images), dim=0), gen)
                _inside(certifier, model, images, attacked, cover)
                after = float(certifier.counts(model, spec.apply(images, attack.patch, gen)[0], cover).sum())
            moved.append(after != before)
            if certifier.method == "rf-clip":  # not a vacuous check: the attack moved the counter its way
                assert after > before if objective == "maximize" else after < before, objective
        # rf-mask masks the densest window, where a strong patch ends up: one of the objectives must still move it
        assert any(moved[-2:]), certifier.method


def test_any_values_written_into_a_reachable_window_stay_inside():
    """The certificates' own premise, exhaustively: every w×w window of a map, filled with arbitrary non-negative
    values (at most dmax for rf-clip), extremes included."""
    from models.receptive_field import ReceptiveField

    gen = torch.Generator().manual_seed(2)
    rf, side = ReceptiveField(9, 2, -4), 6
    w = rf.window(side)
    clean = torch.rand(2, 1, 11, 14, generator=gen) * (torch.rand(2, 1, 11, 14, generator=gen) > 0.5)
    dmax = 0.6
    calibration = Calibration(dmax, {side: 1.7})
    for certifier in (RFClipCertifier(rf, calibration), RFMaskCertifier(rf, calibration),
                      RFMaskCertifier(rf, Calibration(dmax, {side: -0.4}, slope={side: 2.5})),
                      RFMaskCertifier(rf, Calibration(dmax, {side: 3.0}, slope={side: 0.0}))):
        bounds = certifier.certify_batch(lambda _, m=clean: m, clean, [side])
        high = dmax if certifier.method == "rf-clip" else 10.0
        for top in range(11 - w + 1):
            for left in range(14 - w + 1):
                for fill in ("zeros", "high", "random"):
                    attacked = clean.clone()
                    window = attacked[:, :, top:top + w, left:left + w]
                    window.copy_({"zeros": torch.zeros_like(window), "high": torch.full_like(window, high),
                                  "random": torch.rand(window.shape, generator=gen) * high}[fill])
                    counts = certifier.counts(lambda _, m=attacked: m, clean, side)
                    for b, count in zip(bounds, counts.tolist(), strict=True):
                        slack = TOL * (1 + abs(count))
                        assert b[f"L{side}"] - slack <= count <= b[f"U{side}"] + slack, (certifier.method, top, left)


def test_window_sums_are_box_filters():
    density = torch.rand(1, 1, 5, 7, dtype=torch.float64)
    sums = window_sums(density, 3)
    assert sums.shape == (1, 3, 5)
    assert torch.allclose(sums[0, 1, 2], density[0, 0, 1:4, 2:5].sum())
    assert torch.allclose(window_sums(density, 9)[0, 0, 0], density.sum())  # wider than the map: all of it


def _windows(h: int, w: int, k: int) -> list[tuple[int, int]]:
    kh, kw = min(k, h), min(k, w)
    return [(i, j) for i in range(h - kh + 1) for j in range(w - kw + 1)]


def _union(density: torch.Tensor, k: int, *tops: tuple[int, int]) -> float:
    """The sum of a (h, w) map over the union of the k×k windows (clipped to the map) at `tops`, cell by cell."""
    kh, kw = min(k, density.shape[0]), min(k, density.shape[1])
    cells = torch.zeros(density.shape, dtype=torch.bool)
    for i, j in tops:
        cells[i:i + kh, j:j + kw] = True
    return float(density.double()[cells].sum())


@pytest.mark.parametrize("chunk", [None, 1])
def test_densest_pair_is_the_most_mass_in_the_union_of_two_windows(chunk, monkeypatch):
    """Against the definition: every pair of windows, the union's cells summed one by one (maps narrower than the
    window included), and the window it names belongs to such a pair; all row offsets at once and one at a time;
    scattered cells, and one dense cluster over faint ones (a crowd: most rows of windows cannot hold a better
    pair, and are skipped)."""
    if chunk:
        monkeypatch.setattr("utils.rf_certify.PAIR_CHUNK", chunk)
    gen = torch.Generator().manual_seed(3)
    shapes = ((7, 9, 3), (5, 12, 4), (8, 3, 5), (2, 2, 3), (10, 10, 1), (6, 11, 6), (16, 13, 3), (15, 20, 4))
    for (h, w, k), clustered in itertools.product(shapes, (False, True)):
        density = torch.rand(3, 1, h, w, generator=gen) * (torch.rand(3, 1, h, w, generator=gen) > 0.6)
        if clustered:
            density = density / 20
            density[:, :, h // 3:h // 3 + 3, w // 2:w // 2 + 4] += torch.rand(3, 1, min(3, h - h // 3),
                                                                               min(4, w - w // 2), generator=gen) + 1
        windows = _windows(h, w, k)
        pair, at = densest_pair(density, k)
        for image, one in enumerate(density[:, 0]):
            most = max(_union(one, k, p, q) for p in windows for q in windows)
            assert float(pair[image]) == pytest.approx(most, abs=1e-12), (h, w, k)
            assert max(_union(one, k, windows[int(at[image])], q) for q in windows) == pytest.approx(most, abs=1e-12)
    assert densest_pair(torch.zeros(2, 1, 6, 7), 3)[0].tolist() == [0, 0]  # no row of windows can beat a single one


def test_rf_mask_lower_end_is_attained_and_never_crossed():
    """The lower end is exact: over every window a patch can reach, zeroed or with a large mass written into any one
    of its cells (the attacks that hide the most), the lowest count is L, and none goes below."""
    rf, side = ReceptiveField(5, 1, -2), 1  # one cell of field per pixel of patch: windows of 5 cells
    gen = torch.Generator().manual_seed(4)
    clean = torch.rand(2, 1, 9, 11, generator=gen) * (torch.rand(2, 1, 9, 11, generator=gen) > 0.3)
    clean[1, 0, 2:6, 3:7] += 2.0  # one dense cluster: the densest pair is well below twice the densest window
    k = rf.window(side)
    certifier = RFMaskCertifier(rf, Calibration(1.0, {side: 0.7}, slope={side: 1.3}))
    bounds = certifier.certify_batch(lambda _, m=clean: m, clean, [side])
    for image, b in enumerate(bounds):
        attacks = []
        for i, j in _windows(9, 11, k):
            zeroed = clean[image].clone()
            zeroed[:, i:i + k, j:j + k] = 0
            attacks.append(zeroed)
            for r in range(i, i + k):
                for c in range(j, j + k):
                    spiked = zeroed.clone()
                    spiked[:, r, c] = 100.0
                    attacks.append(spiked)
        attacked = torch.stack(attacks)
        counts = certifier.counts(lambda _, m=attacked: m, attacked, side)
        total, largest = float(clean[image].sum()), float(window_sums(clean[image:image + 1], k).max())
        slack = 1.3 * FLOAT_TOLERANCE * (total + 1)  # the interval's widening for rounding
        assert b[f"L{side}"] <= float(counts.min()) <= b[f"L{side}"] + 2 * slack
        assert b[f"L{side}"] > 1.3 * (total - 2 * largest) + 0.7 + 0.1  # tighter than the bound from 2 max S


@pytest.mark.parametrize("spike", [1e30, 3e38])
def test_rf_mask_count_of_a_map_with_an_extreme_cell_is_the_mass_outside_its_window(spike):
    """An attacked map may hold one value far above the rest: the counter masks the window holding it, so its count
    is a·(the mass outside that window) + c, not T − max S (which cancels to 0), and its density map sums to the
    same, with no inf · 0 from the masked cell (a·3e38 overflows float32)."""
    rf, side = ReceptiveField(5, 1, -2), 1
    k = rf.window(side)
    clean = torch.rand(2, 1, 9, 11, generator=torch.Generator().manual_seed(5)) + 0.5
    attacked = clean.clone()
    attacked[:, 0, 4, 5] = spike
    a, c = 1.3, 0.7
    certifier = RFMaskCertifier(rf, Calibration(1.0, {side: c}, slope={side: a}))
    counts = certifier.counts(lambda _, m=attacked: m, attacked, side)
    mapped = certifier.post(attacked, side).double().sum(dim=(1, 2, 3))
    for image, (count, summed) in enumerate(zip(counts.tolist(), mapped.tolist(), strict=True)):
        outside = [float(clean[image].double().sum() - clean[image, :, i:i + k, j:j + k].double().sum())
                   for i, j in _windows(9, 11, k) if i <= 4 < i + k and j <= 5 < j + k]
        assert a * min(outside) + c - TOL <= count <= a * max(outside) + c + TOL, (count, outside)
        assert summed == pytest.approx(count, rel=1e-5)


@pytest.mark.parametrize("values", [(1e30, 1e13), (math.inf, 1.0), (math.nan, 1.0), (-math.inf, 5.0)],
                         ids=["huge-beside-large", "inf", "nan", "-inf"])
def test_whatever_a_patch_makes_the_network_write_both_counts_stay_in_their_intervals(values):
    """Two cells one patch reaches set to anything a float holds: each certified count stays in its interval. With
    1e30 and 1e13 every window holding the first sums, in float64, to 1e30 alone; uncapped, rf-mask masked the first
    such window, which misses the 1e13 cell, and counted it."""
    rf, side = ReceptiveField(5, 1, -2), 1
    clean = torch.rand(1, 1, 9, 11, generator=torch.Generator().manual_seed(6)) + 0.5
    attacked = clean.clone()
    attacked[0, 0, 4, 5], attacked[0, 0, 4, 7] = values  # both in the 5×5 window at (0, 3), not in the first at (0, 1)
    calibration = Calibration(2.0, {side: 0.7}, slope={side: 1.3})
    for certifier in (RFMaskCertifier(rf, calibration), RFClipCertifier(rf, calibration)):
        bounds = certifier.certify_batch(lambda _, m=clean: m, clean, [side])[0]
        count = float(certifier.counts(lambda _, m=attacked: m, attacked, side)[0])
        assert bounds[f"L{side}"] <= count <= bounds[f"U{side}"], (certifier.method, count, bounds)
        assert float(certifier.post(attacked, side).double().sum()) == pytest.approx(count, rel=1e-5)


def test_calibration_round_trip_and_bad_input(tiny_crowds, tmp_path):
    from datasets.crowd import CrowdDataset

    model = build("mcnn", seed=1).eval()
    rf = receptive_field(model)
    split = CrowdDataset.for_model(tiny_crowds / "train_data", model, max_images=2)
    constant = calibrate(model, split, rf, [10, 20], torch.device("cpu"), amp=False)  # the default refill
    assert constant.dmax > 0 and constant.c[20] >= constant.c[10] > 0  # a wider window holds more
    assert constant.refill == "constant" and constant.slope == {}
    assert Calibration.load(constant.save(tmp_path / "constant.json")) == constant
    calibration = calibrate(model, split, rf, [10, 20], torch.device("cpu"), amp=False, refill="fitted")
    assert Calibration.load(calibration.save(tmp_path / "calibration.json")) == calibration
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ToolkitError, match="is not a calibration"):
        Calibration.load(tmp_path / "bad.json")
    with pytest.raises(ToolkitError, match="no rf-mask constant for 30 px"):
        RFMaskCertifier(rf, calibration).certify_batch(model, torch.rand(1, 3, 64, 64), [30])
    assert calibration.refill == "fitted" and set(calibration.slope) == {10, 20}
    assert all(a >= 0 for a in calibration.slope.values())
    assert constant.dmax == calibration.dmax
    saved = json.loads((tmp_path / "calibration.json").read_text())
    (tmp_path / "negative.json").write_text(json.dumps({**saved, "slope": {"10": -1.0}}))
    with pytest.raises(ToolkitError, match="negative rf-mask slope"):
        Calibration.load(tmp_path / "negative.json")
    for bad, message in (({"slope": {"10": float("inf"), "20": 1.0}}, "slope of side 10 must be a finite number"),
                         ({"c": {"10": "2.5", "20": 1.0}}, "c of side 10 must be a finite number"),
                         ({"dmax": True}, "dmax must be a finite number"), ({"dmax": -1.0}, "dmax must be positive"),
                         ({"dmax": 1e39}, "at most 1000 \\(the cap on a cell\\)"),
                         ({"quantile": 5}, "the quantile in"), ({"refill": "bogus"}, "unknown refill"),
                         ({"slope": {"10": 1.0}}, "a slope for every side"),
                         ({"slope": {"10": 1.0, "20": 1.0, "30": 1.0}}, "a slope for a side with no intercept")):
        (tmp_path / "bad.json").write_text(json.dumps({**saved, **bad}))
        with pytest.raises(ToolkitError, match=message):
            Calibration.load(tmp_path / "bad.json")
    old = {k: v for k, v in saved.items() if k not in ("slope", "refill")}  # a calibration from before the refill
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert RFMaskCertifier(rf, Calibration.load(tmp_path / "old.json"))._refill(10) == (1.0, calibration.c[10])


def test_the_validated_refill_picks_per_side_what_certifies_the_held_out_images_better(tiny_crowds, tmp_path):
    """Against an independent route: each refill calibrated on the training part alone, the held-out images certified
    by the certifier itself; the choice is the lower tight-MAE, and the constants are then those of the whole split."""
    from datasets.crowd import CrowdDataset

    model, cpu, sides = build("mcnn", seed=1).eval(), torch.device("cpu"), [10, 20]
    rf = receptive_field(model)
    split = CrowdDataset.for_model(tiny_crowds / "train_data", model)
    validated = calibrate(model, split, rf, sides, cpu, amp=False, refill="validated", seed=3)
    assert Calibration.load(validated.save(tmp_path / "validated.json")) == validated
    whole = {refill: calibrate(model, split, rf, sides, cpu, amp=False, refill=refill)
             for refill in ("constant", "fitted")}
    training, held = split.holdout(0.1, 3)
    images = torch.stack([held[i][0] for i in range(len(held))])
    gt = np.array([held[i][2] for i in range(len(held))])
    for s in sides:
        errors = {}
        for refill in ("constant", "fitted"):
            rows = RFMaskCertifier(rf, calibrate(model, training, rf, [s], cpu, amp=False, refill=refill)
                                   ).certify_batch(model, images, [s])
            errors[refill] = np.mean([max(abs(r[f"L{s}"] - g), abs(r[f"U{s}"] - g))
                                      for r, g in zip(rows, gt, strict=True)])
            assert validated.validation[s][refill] == pytest.approx(errors[refill], rel=1e-3)
        chosen = min(errors, key=errors.get)
        assert validated.validation[s]["chosen"] == chosen
        assert (validated.c[s], validated.slope.get(s)) == pytest.approx((whole[chosen].c[s],
                                                                          whole[chosen].slope.get(s)))
    assert validated.held_out == held.names
    saved = json.loads((tmp_path / "validated.json").read_text())
    for bad in ({"validation": {**saved["validation"], "10": {**saved["validation"]["10"], "chosen": "neither"}}},
                {"validation": {"10": saved["validation"]["10"]}}, {"refill": "constant"}):
        (tmp_path / "bad.json").write_text(json.dumps({**saved, **bad}))
        with pytest.raises(ToolkitError, match="validated"):
            Calibration.load(tmp_path / "bad.json")


def _certified_error(a: float, c: float, low, high, gt) -> float:
    return float(np.maximum(np.abs(a * low + c - gt), np.abs(a * high + c - gt)).sum())


def test_the_fitted_refill_is_the_best_affine_refill_on_its_split():
    """`fit_refill` against a brute-force search over (a, c): no grid point certifies the split with a smaller
    summed error, and a stays non-negative (the certificate needs a monotone counter) even when the data pull the
    other way."""
    gen = np.random.default_rng(0)
    u = gen.uniform(0, 100, 60)
    low, high = u - gen.uniform(0, 10, 60), u + gen.uniform(0, 10, 60)
    for gt in (1.4 * u + 5 + gen.normal(0, 3, 60), 80 - 0.5 * u + gen.normal(0, 3, 60)):  # an undercount; a < 0
        a, c = fit_refill(low, high, gt)
        assert a >= 0
        best = _certified_error(a, c, low, high, gt)
        grid = min(_certified_error(ga, gc, low, high, gt) for ga in np.linspace(0, 2, 81)
                   for gc in np.linspace(-20, 120, 141))
        assert best <= grid + 1e-6
    assert fit_refill(low, high, 1.4 * u + 5 + gen.normal(0, 3, 60))[0] == pytest.approx(1.4, abs=0.1)


# Soundness at the toolkit's defaults: the real patch engine (default rotation and scale, bilinear rim) at the
# default sides, at many sub-pixel placements, on counters built so that one reached cell more changes the count.
DEFAULT_SIDES = (20, 40, 44, 81, 163)
FIELDS = {"mcnn": (72, -34), "smallfield": (33, -16)}  # (side, offset) at stride 4, as receptive_field measures them


def _changed_spans(clean: torch.Tensor, attacked: torch.Tensor) -> list[tuple[int, int]]:
    """Per image, the number of rows and of columns spanned by the output cells that changed."""
    spans = []
    for changed in (attacked - clean).abs().sum(1) > 0:
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        spans.append((int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)) if len(rows) else (0, 0))
    return spans


def _attack_everywhere(model, spec: PatchSpec, background: float, patch_value: float, placements: int,
                       gen: torch.Generator, extra_cells: int = 6) -> tuple:
    """(rf, window, images, attacked, clean density, attacked density): `placements` pastes of a uniform patch on a
    uniform background at real-valued centres anywhere in an image wide enough for the window to fit."""
    rf = receptive_field(model)
    w = rf.window(RFMaskCertifier.covered_side(spec))
    side = (w + extra_cells) * rf.stride + spec.extent_side
    side += -side % model.size_multiple
    images = torch.full((placements, 3, side, side), background)
    centers = torch.rand(placements, 2, generator=gen) * side
    attacked, _ = spec.paste(images, torch.full((3, spec.side, spec.side), patch_value), centers, gen)
    with torch.no_grad():
        return rf, w, images, attacked, model(images), model(attacked)


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("kind", ["max", "min"])
def test_adversarial_counters_at_the_default_sides_stay_inside(pool_counter, field, kind):
    """A max-pooling counter on black with a bright patch, a min-pooling one on white with a dark patch: every cell
    the patch reaches moves, so the span of moved cells is the patch's reach; it never exceeds the window, and the
    attacked rf-mask and rf-clip counts stay in their intervals."""
    gen = torch.Generator().manual_seed(3)
    model = pool_counter(kind, *FIELDS[field], 4)
    background, bright = (0.0, 1.0) if kind == "max" else (1.0, 0.0)
    for size in DEFAULT_SIDES:
        spec = PatchSpec(size)
        rf, w, images, attacked, clean, density = _attack_everywhere(model, spec, background, bright, 96, gen)
        assert rf == ReceptiveField(FIELDS[field][0], 4, FIELDS[field][1])
        spans = _changed_spans(clean, density)
        assert max(max(s) for s in spans) <= w, (size, w, max(spans))
        assert max(max(s) for s in spans) >= w - 1, (size, w)  # the bound is nearly reached: the test can see it
        side = RFMaskCertifier.covered_side(spec)
        calibration = Calibration(1.0, {side: 0.5})
        for certifier in (RFClipCertifier(rf, calibration), RFMaskCertifier(rf, calibration),
                          RFMaskCertifier(rf, Calibration(1.0, {side: -0.5}, slope={side: 1.6}))):
            _inside(certifier, model, images[:1], attacked, side)


def test_the_x8_period_of_an_upsampling_counter_is_covered(pool_counter):
    """Each cell repeated 8 times (CSRNet's upsampling, stride 1): the field covers all 8 phases."""
    gen = torch.Generator().manual_seed(4)
    model = pool_counter("max", 72, -34, 1, upsample=8)
    assert receptive_field(model) == ReceptiveField(72 + 7, 1, -34 - 7)
    for size in (20, 40):
        rf, w, images, attacked, clean, density = _attack_everywhere(model, PatchSpec(size), 0.0, 1.0, 48, gen, 16)
        assert max(max(s) for s in _changed_spans(clean, density)) <= w, size
        side = RFMaskCertifier.covered_side(PatchSpec(size))
        _inside(RFMaskCertifier(rf, Calibration(1.0, {side: 0.0})), model, images[:1], attacked, side)


@pytest.mark.parametrize("name", ["mcnn", "smallfield"])
def test_real_models_at_the_default_sides_stay_inside(name, shared_dir):
    """MCNN with its real Part A weights and SmallField (random, seed 1): random patches on random images."""
    gen = torch.Generator().manual_seed(5)
    weights = shared_dir / "weights" / "mcnn_shtechA_660.h5" if name == "mcnn" else None
    model = build(name, weights, seed=1).eval()
    rf = receptive_field(model)
    for size in (40, 81):
        spec = PatchSpec(size)
        side = RFMaskCertifier.covered_side(spec)
        w = rf.window(side)
        n = (w + 2) * 4
        images = torch.rand(2, 3, n, n, generator=gen)
        centers = torch.rand(12, 2, generator=gen) * n
        batch = images.repeat(6, 1, 1, 1)
        attacked, _ = spec.paste(batch, random_patch(size, gen), centers, gen)
        with torch.no_grad():
            spans = _changed_spans(model(batch), model(attacked))
        assert max(max(s) for s in spans) <= w, (name, size)
        for certifier in _certifiers(model, images, [side]):
            _inside(certifier, model, images, attacked, side)


def test_intervals_hold_for_an_image_counted_in_any_batch(shared_dir):
    """The same image certified alone and counted (attacked) inside a batch of 48 by the model in the other memory
    layout (scripts run channels-last): float rounding differs with the batch and the layout, and the intervals'
    tolerance absorbs it."""
    import copy

    from utils.runtime import prepare_model

    gen = torch.Generator().manual_seed(6)
    model = build("mcnn", shared_dir / "weights" / "mcnn_shtechA_660.h5").eval()
    channels_last = prepare_model(copy.deepcopy(model), torch.device("cpu"))
    spec = PatchSpec(40)
    side = RFMaskCertifier.covered_side(spec)
    images = torch.rand(48, 3, 128, 160, generator=gen)
    for certifier in _certifiers(model, images[:1], [side]):
        alone = certifier.certify_batch(model, images[:1], [side])[0]
        in_batch = certifier.certify_batch(model, images, [side])[0]
        count = alone.get(f"count{side}", alone.get("count"))
        moved = abs(count - in_batch.get(f"count{side}", in_batch.get("count")))
        assert moved <= FLOAT_TOLERANCE * (count + 1) / 100, moved  # rounding: far below the tolerance
        attacked, _ = spec.paste(images.clone(), random_patch(40, gen), sweep_centers(128, 160, 40, 1).expand(48, 2),
                                 gen)
        counted = certifier.counts(channels_last, attacked, side)[0]
        assert alone[f"L{side}"] <= counted <= alone[f"U{side}"], certifier.method
        assert alone[f"L{side}"] < count - FLOAT_TOLERANCE * count / 2  # widened, by about the tolerance


def test_certifiers_refuse_a_model_in_training_mode():
    model = build("smallfield", seed=0).train()
    rf = receptive_field(model)
    with pytest.raises(ToolkitError, match="training mode"):
        RFMaskCertifier(rf, Calibration(1.0, {20: 0.0})).certify_batch(model, torch.rand(2, 3, 64, 64), [20])
    with pytest.raises(ToolkitError, match="training mode"):
        RFClipCertifier(rf, Calibration(1.0, {})).counts(model, torch.rand(2, 3, 64, 64), 20)


def test_a_calibration_for_another_field_is_refused(tmp_path):
    from utils.rf_certify import load_calibration

    mcnn, small = ReceptiveField(72, 4, -34), ReceptiveField(33, 4, -16)
    path = Calibration(1.0, {20: 0.0}, receptive_field=asdict(mcnn)).save(tmp_path / "calibration.json")
    assert load_calibration(path, mcnn).dmax == 1.0
    with pytest.raises(ToolkitError, match="was measured for the receptive field"):
        load_calibration(path, small)

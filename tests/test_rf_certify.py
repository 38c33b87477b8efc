"""Receptive-field certificates are sound: no patch content, placement or optimised attack, and no values written
into the cells a patch can reach, ever takes the certified counter outside [L, U]."""
import pytest
import torch

from models import build
from models.receptive_field import receptive_field
from utils.attack import APAM, APAMConfig
from utils.errors import ToolkitError
from utils.patch import PatchSpec, PatchTransform, random_patch, sweep_centers
from utils.rf_certify import Calibration, RFClipCertifier, RFMaskCertifier, calibrate, window_sums

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
    return [RFClipCertifier(rf, calibration), RFMaskCertifier(rf, calibration)]


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
    for certifier in (RFClipCertifier(rf, calibration), RFMaskCertifier(rf, calibration)):
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


def test_calibration_round_trip_and_bad_input(tiny_crowds, tmp_path):
    from datasets.crowd import CrowdDataset

    model = build("mcnn", seed=1).eval()
    rf = receptive_field(model)
    split = CrowdDataset.for_model(tiny_crowds / "train_data", model, max_images=2)
    calibration = calibrate(model, split, rf, [10, 20], torch.device("cpu"), amp=False)
    assert calibration.dmax > 0 and calibration.c[20] >= calibration.c[10] > 0  # a wider window holds more
    assert Calibration.load(calibration.save(tmp_path / "calibration.json")) == calibration
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ToolkitError, match="is not a calibration"):
        Calibration.load(tmp_path / "bad.json")
    with pytest.raises(ToolkitError, match="no rf-mask constant for 30 px"):
        RFMaskCertifier(rf, calibration).certify_batch(model, torch.rand(1, 3, 64, 64), [30])

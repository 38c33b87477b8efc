"""The structural receptive field: the classic models' values, the brute-force support of tiny nets, refusals."""
import pytest
import torch

from models import build
from models.counter import CrowdCounter
from models.receptive_field import PERIOD, GlobalFieldError, ReceptiveField, receptive_field


def perturbation_support(model: CrowdCounter, side: int, cell: int) -> tuple[int, int]:
    """First and last input row or column whose change moves output cell (cell, cell): one pixel at a time."""
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(x)[0, 0, cell, cell]
        hits = torch.zeros(side, side, dtype=torch.bool)
        pixels = [(i, j) for i in range(side) for j in range(side)]
        for start in range(0, len(pixels), 512):
            chunk = pixels[start:start + 512]
            batch = x.repeat(len(chunk), 1, 1, 1)
            for k, (i, j) in enumerate(chunk):
                batch[k, :, i, j] += 5.0  # large enough to win its max-pool window
            moved = (model(batch)[:, 0, cell, cell] - base).abs() > 1e-4  # far above batching round-off
            for k in moved.nonzero().flatten().tolist():
                hits[chunk[k]] = True
    rows, cols = hits.any(1).nonzero().flatten(), hits.any(0).nonzero().flatten()
    return int(min(rows[0], cols[0])), int(max(rows[-1], cols[-1]))


@pytest.mark.parametrize("name", ["conv-pool", "dilated"])
def test_the_field_is_the_brute_force_support_of_each_cell(name, tiny_counter):
    model, side = tiny_counter(name), 48
    rf = receptive_field(model)
    for cell in (side // model.stride // 2, side // model.stride // 2 + 1):
        start = cell * rf.stride + rf.offset
        assert perturbation_support(model, side, cell) == (start, start + rf.side - 1)


def test_uneven_fields_are_covered_by_the_evenly_spaced_one(tiny_counter):
    model, side = tiny_counter("upsampling"), 40
    rf = receptive_field(model)
    spans = [(c, perturbation_support(model, side, c)) for c in range(side // 2, side // 2 + PERIOD)]
    assert all(c + rf.offset <= lo and hi <= c + rf.offset + rf.side - 1 for c, (lo, hi) in spans)
    assert min(lo - c for c, (lo, _) in spans) == rf.offset  # the smallest such field: tight at both ends
    assert max(hi - c for c, (_, hi) in spans) == rf.offset + rf.side - 1


def test_the_classic_models():
    assert receptive_field(build("mcnn")) == ReceptiveField(72, 4, -34)  # its 9-7-7-7 column, two 2x pools
    cmtl = receptive_field(build("cmtl"))  # the density path is local: the global prior feeds only the classifier
    assert cmtl.stride == 1 and 100 < cmtl.side < 128


def test_smallfield_sees_a_fraction_of_mcnns_field(monkeypatch):
    from models import smallfield

    assert receptive_field(build("smallfield")) == ReceptiveField(33, 4, -16)  # five 3x3 convs (two at stride 2)
    assert receptive_field(build("smallfield", blocks=2)) == ReceptiveField(49, 4, -24)  # two more at stride 4
    assert receptive_field(build("smallfield", norm=False)) == ReceptiveField(33, 4, -16)
    monkeypatch.setattr(smallfield, "DENSITY_SCALE", 1.0)  # changes on the scale of the brute force's threshold
    for blocks, side, seed in ((1, 48, 0), (2, 64, 3)):  # seeds whose output cells are alive at init
        model = build("smallfield", width=4, blocks=blocks, seed=seed).eval()
        rf = receptive_field(model)
        for cell in (side // 4 // 2, side // 4 // 2 + 1):  # brute force: inside the field (ReLUs dead at random
            start = cell * rf.stride + rf.offset  # init may hide its rim), and most of it
            lo, hi = perturbation_support(model, side, cell)
            assert start <= lo and hi <= start + rf.side - 1 and hi - lo + 1 > rf.side // 2, (lo, hi, start)


@pytest.mark.slow
def test_csrnet():
    assert receptive_field(build("csrnet")) == ReceptiveField(284, 8, -138)  # VGG-16 to conv4_3, 6 dilated 3x3


def test_global_fields_are_refused_naming_the_layer():
    with pytest.raises(GlobalFieldError, match=r"danet has no bounded receptive field: its deformable convolutions "
                                               r"\(DA_Net.conv4, DA_Net.conv5, DA_Net.conv6, DA_Net.conv7\)"):
        receptive_field(build("danet"))
    with pytest.raises(GlobalFieldError, match=r"can has no bounded receptive field: its whole-map pooling "
                                               r"\(scale_pools.0, .*\) lets every output cell see the whole image"):
        receptive_field(build("can"), start=64)


def test_window_counts_the_cells_a_patch_can_reach():
    rf = ReceptiveField(10, 2, -4)
    for patch in (1, 5, 12):
        most = max(sum(1 for j in range(-20, 40) if j * 2 - 4 + 9 >= a and j * 2 - 4 <= a + patch - 1)
                   for a in range(0, 8))
        assert rf.window(patch) == most


class _Net(torch.nn.Module):
    """A one-channel network from a function of the grey input (tests of what the measurement sees)."""

    def __init__(self, forward, *modules):
        super().__init__()
        self.layers, self.fn = torch.nn.ModuleList(modules), forward

    def forward(self, x):
        return self.fn(x, *self.layers)


def _counter(forward, *modules, stride: int = 1, multiple: int = 1) -> CrowdCounter:
    return CrowdCounter("probe", _Net(forward, *modules), stride=stride, size_multiple=multiple,
                        native_channels=1).eval()


def test_functional_and_dilated_pooling_are_measured_whole():
    """A max pool called as a function (its gradient reaches one pixel of the window) and a dilated one (the average
    pool that stood in for it had no dilation) both see their whole window."""
    from torch.nn import functional as F

    assert receptive_field(_counter(lambda x: F.max_pool2d(x, 21, 1, 10))) == ReceptiveField(21, 1, -10)
    dilated = _counter(lambda x, pool: pool(x), torch.nn.MaxPool2d(5, 1, 4, dilation=2))
    assert receptive_field(dilated) == ReceptiveField(9, 1, -4)
    assert receptive_field(_counter(lambda x: torch.maximum(x, F.avg_pool2d(x, 3, 1, 1)))) == ReceptiveField(3, 1, -1)


def test_long_periods_and_pixel_shuffles_are_covered():
    """×32 nearest upsampling repeats each cell 32 times: every phase is measured. A pixel shuffle whose
    sub-positions see different windows: the field holds all of them."""
    from torch.nn import functional as F

    up = _counter(lambda x: F.interpolate(F.max_pool2d(x, 32), scale_factor=32), multiple=32)
    assert receptive_field(up) == ReceptiveField(32 + 31, 1, -31)

    def shuffle(x):  # sub-position (0, 1) pools 21 px, the others 1
        return F.pixel_shuffle(torch.cat([x, F.max_pool2d(x, 21, 1, 10), x, x], 1)[:, :, ::2, ::2], 2)

    rf = receptive_field(_counter(shuffle, multiple=2))
    assert rf.stride == 1 and rf.side >= 21 + 1


@pytest.mark.parametrize("case", ["circular", "batch statistics", "comparison", "adaptive"])
def test_what_cannot_be_measured_is_refused(case):
    from torch.nn import functional as F

    from models.receptive_field import UnmeasurableFieldError

    counter = {
        "circular": _counter(lambda x, conv: conv(x), torch.nn.Conv2d(1, 1, 17, padding=8, padding_mode="circular")),
        "batch statistics": _counter(lambda x, bn: bn(x), torch.nn.BatchNorm2d(1, track_running_stats=False)),
        "comparison": _counter(lambda x: x * (x >= F.max_pool2d(x, 9, 1, 4))),
        "adaptive": _counter(lambda x: F.interpolate(F.adaptive_max_pool2d(x, 32), size=x.shape[-2:])),
    }[case]
    with pytest.raises(UnmeasurableFieldError, match="probe has no measurable receptive field"):
        receptive_field(counter)

"""utils/local_eval.py: a patched image evaluated where the patch reaches gives the density of the whole pass, for
every model with a bounded field, at every position (borders and corners included), with and without a certified
counter's post-processing; and a placement sweep counts the same through it."""
import pytest
import torch

from models import build
from utils.ablation import AblationSpec
from utils.attack import patched_counts
from utils.certify import AblationCertifier
from utils.local_eval import LocalCounter, LocalSmoothedCounter, local_counter
from utils.patch import PatchSpec, random_patch
from utils.rf_certify import Calibration, RFClipCertifier, RFMaskCertifier


def _sweep(images: torch.Tensor, spec: PatchSpec, seed: int = 0) -> torch.Tensor:
    """(N, K, C, H, W): a random patch pasted at K positions per image, corners and edges included."""
    n, _, h, w = images.shape
    centers = torch.tensor([[0, 0], [w, h], [w / 2, 0], [0, h / 2], [w / 3, h / 2], [w - 5, 7]], dtype=torch.float)
    k = len(centers)
    patch = random_patch(spec.side, torch.Generator().manual_seed(seed))
    patched, _ = spec.paste(images.repeat_interleave(k, 0), patch, centers.repeat(n, 1),
                            torch.Generator().manual_seed(seed))
    return patched.view(n, k, *patched.shape[1:])


@pytest.mark.parametrize("name", ["mcnn", "smallfield", "cmtl", "csrnet"])
def test_local_density_equals_the_whole_pass(name):
    model = build(name, seed=0).eval()
    m = model.size_multiple
    images = torch.rand(2, 3, 12 * m, 16 * m, generator=torch.Generator().manual_seed(1))
    patched = _sweep(images, PatchSpec(20, "circle"))
    counter = local_counter(model)
    if not isinstance(counter, LocalCounter):  # no local evaluation for this field: the whole pass, unchanged
        assert counter is model
        return
    with torch.no_grad():
        local = counter.patched_density(images, patched)
        whole = model(patched.flatten(0, 1))
    assert local.shape == whole.shape
    torch.testing.assert_close(local, whole, atol=1e-6, rtol=1e-5)


def test_the_patch_reaches_only_part_of_the_image():
    """The crops are small: what makes a sweep cheap (a 40 px patch on a 768×1024 Part B image, through MCNN's 72 px
    field, reaches under a tenth of its cells); the crop holds the patch and starts on MCNN's size grid."""
    counter = LocalCounter(build("mcnn", seed=0).eval())
    top, left = 364, 492
    r0, r1, y0, y1 = counter._span(top, top + 40, 768, 192)
    c0, c1, x0, x1 = counter._span(left, left + 40, 1024, 256)
    assert (y1 - y0) * (x1 - x0) < 0.1 * 768 * 1024
    assert y0 <= top and top + 40 <= y1 and x0 <= left and left + 40 <= x1 and y0 % 4 == x0 % 4 == 0
    # every cell whose field meets the patch is recomputed, and its whole field lies in the crop
    rf = counter.rf
    for start, length, (cell0, cell1, p0, p1), cells in ((top, 40, (r0, r1, y0, y1), 192),
                                                          (left, 40, (c0, c1, x0, x1), 256)):
        meets = [j for j in range(cells) if j * rf.stride + rf.offset <= start + length - 1
                 and j * rf.stride + rf.offset + rf.side - 1 >= start]
        assert meets == list(range(cell0, cell1))
        assert p0 <= max(0, cell0 * rf.stride + rf.offset) and (cell1 - 1) * rf.stride + rf.offset + rf.side <= p1


@pytest.mark.parametrize("certifier", [RFClipCertifier, RFMaskCertifier])
def test_certified_counters_evaluate_locally_as_a_whole(certifier):
    model = build("mcnn", seed=0).eval()
    counter = LocalCounter(model)
    cert = certifier(counter.rf, Calibration(dmax=0.01, c={43: 3.0}, quantile=0.999, refill="constant"))
    images = torch.rand(2, 3, 96, 128)
    patched = _sweep(images, PatchSpec(20, "circle"))
    with torch.no_grad():
        local = cert.local_counter(model, 43).patched_density(images, patched)
        whole = cert.density(model, patched.flatten(0, 1), 43)
    torch.testing.assert_close(local, whole, atol=1e-6, rtol=1e-5)


def test_a_sweep_counts_the_same_locally():
    model = build("smallfield", seed=0).eval()
    images = torch.rand(3, 3, 96, 128)
    spec, patch = PatchSpec(24, "circle"), random_patch(24, torch.Generator().manual_seed(2))
    gt = torch.tensor([5.0, 50.0, 500.0])
    counts = [patched_counts(m, images, gt, patch, spec, "sweep", torch.Generator().manual_seed(3), amp=False)[0]
              for m in (model, LocalCounter(model))]
    torch.testing.assert_close(counts[0], counts[1], atol=1e-4, rtol=1e-5)


def test_a_sweep_after_the_clean_count_reuses_its_pass_unless_the_images_changed():
    model = build("mcnn", seed=0).eval()
    counter, calls = LocalCounter(model), []
    counter.net = lambda x: calls.append(x.shape) or model(x)
    images = torch.rand(2, 3, 96, 128)
    patched = _sweep(images, PatchSpec(20, "circle"))
    with torch.no_grad():
        counter(images)
        local = counter.patched_density(images, patched)
        assert len(calls) == 1 + patched.shape[1]  # the clean pass, then one crop per position
        torch.testing.assert_close(local, model(patched.flatten(0, 1)), atol=1e-6, rtol=1e-5)
        images.mul_(0.5)  # changed in place: the earlier pass no longer holds
        patched = _sweep(images, PatchSpec(20, "circle"))
        torch.testing.assert_close(counter.patched_density(images, patched), model(patched.flatten(0, 1)),
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("keep, unit", [(45, "element"), (3000, "pixel")])
def test_smoothed_counts_of_a_sweep_are_the_medians_over_the_images_own_ablations(keep, unit):
    """Each patched version's smoothed count is the median over the same ablations as its image, computed whole;
    few kept units (some ablations keep one under the patch) or many (all do) alike."""
    model = build("mcnn", seed=0).eval()
    spec, samples = AblationSpec(keep, unit), 5
    counter = LocalSmoothedCounter(model, spec, samples, torch.Generator().manual_seed(0), batch_size=2)
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    patched = _sweep(images, PatchSpec(20, "circle"))
    with torch.no_grad():
        counter(images)
        local = counter.patched_density(images, patched).flatten()
        draws = counter._last[2]
        whole = torch.stack([model(spec.ablate_at(patched[i, j].expand(samples, -1, -1, -1), draws[i]))
                             .sum(dim=(1, 2, 3)).quantile(0.5)
                             for i in range(len(images)) for j in range(patched.shape[1])])
    torch.testing.assert_close(local, whole, atol=1e-5, rtol=1e-5)


def test_smoothed_clean_counts_draw_the_ablations_of_the_certifier():
    """The same generator gives the same ablations, hence the same median counts, as `AblationCertifier.density`."""
    model = build("mcnn", seed=0).eval()
    spec = AblationSpec(500, "element")
    images = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    cert = AblationCertifier(spec, 6, generator=torch.Generator().manual_seed(5))
    counter = cert.local_counter(model)
    assert isinstance(counter, LocalSmoothedCounter)
    with torch.no_grad():
        local = counter(images)
        whole = AblationCertifier(spec, 6, generator=torch.Generator().manual_seed(5)).density(model, images)
    torch.testing.assert_close(local, whole)


def test_a_smoothed_counter_needs_a_bounded_field():
    cert = AblationCertifier(AblationSpec(45), 4, generator=torch.Generator().manual_seed(0))
    counter = cert.local_counter(build("can", seed=0).eval())
    assert not isinstance(counter, LocalSmoothedCounter) and counter.func == cert.density


def test_a_smoothed_sweep_after_the_clean_count_makes_no_whole_pass():
    """Through `patched_counts`, as `evaluate_patch` sweeps: the clean count's ablations are the only whole passes,
    and the worst position's count is the median over the image's own ablations of the patched image."""
    model = build("mcnn", seed=0).eval()
    spec, samples = AblationSpec(45), 4
    counter, shapes = LocalSmoothedCounter(model, spec, samples, torch.Generator().manual_seed(0)), []
    counter.local.net = lambda x: shapes.append(tuple(x.shape[-2:])) or model(x)
    images = torch.rand(2, 3, 192, 256, generator=torch.Generator().manual_seed(1))  # larger than any crop
    patch = random_patch(24, torch.Generator().manual_seed(2))
    with torch.no_grad():
        counter(images)
        counts, patched, _ = patched_counts(counter, images, torch.tensor([0.0, 1e4]), patch, PatchSpec(24, "circle"),
                                            "sweep", torch.Generator().manual_seed(3), amp=False)
        draws = counter._last[2]
        whole = torch.stack([model(spec.ablate_at(patched[i].expand(samples, -1, -1, -1), draws[i]))
                             .sum(dim=(1, 2, 3)).quantile(0.5) for i in range(2)])
    assert shapes.count((192, 256)) == 2  # one batch of ablations per image, before the sweep
    torch.testing.assert_close(counts, whole, atol=1e-5, rtol=1e-5)

import math

import numpy as np
import pytest
import torch

from utils.errors import ToolkitError
from utils.patch import (
    PatchSpec,
    PatchTransform,
    footprint_side,
    load_patch,
    make_mask,
    patch_side,
    sample_centers,
    save_patch,
    sweep_centers,
)


@pytest.mark.parametrize("shape", ["square", "circle"])
def test_untransformed_patch_lands_exactly_where_asked(shape):
    images = torch.rand(3, 3, 50, 64)
    patch, spec = torch.rand(3, 10, 10), PatchSpec(10, shape, PatchTransform.none())
    mask = spec.mask
    centers = torch.tensor([[5.0, 5.0], [32.0, 25.0], [59.0, 45.0]])  # corners and middle, integer-aligned
    out, covered = spec.paste(images, patch, centers)
    for img, orig, (cx, cy) in zip(out, images, centers.int().tolist(), strict=True):
        top, left = cy - 5, cx - 5
        window = img[:, top:top + 10, left:left + 10]
        torch.testing.assert_close(window, patch * mask + orig[:, top:top + 10, left:left + 10] * (1 - mask))
        outside = torch.ones(50, 64, dtype=torch.bool)
        outside[top:top + 10, left:left + 10] = False
        torch.testing.assert_close(img[:, outside], orig[:, outside])
    torch.testing.assert_close(covered.sum(dim=(1, 2, 3)), mask.sum().expand(3))


@pytest.mark.parametrize("size", [20, 40, 81, 163])
def test_circle_mask_area_is_pi_r_squared(size):
    assert make_mask(size, "circle").sum().item() == pytest.approx(math.pi * (size / 2) ** 2, rel=0.02)


def test_random_transforms_stay_near_the_nominal_area_and_vary_per_image():
    images = torch.zeros(16, 3, 96, 96)
    patch, spec = torch.ones(3, 20, 20), PatchSpec(20, "square")
    g = torch.Generator().manual_seed(0)
    centers = sample_centers(16, 96, 96, 20, "random", g)
    out, covered = spec.paste(images, patch, centers, g)
    areas = covered.sum(dim=(1, 2, 3))
    assert ((areas > 400 * 0.975**2 * 0.98) & (areas < 400 * 1.025**2 * 1.02)).all()
    assert len({tuple(c) for c in centers.tolist()}) == 16
    assert ((centers >= 10) & (centers <= 86)).all()
    assert out.max() <= 1.0 and out.min() >= 0.0


@pytest.mark.parametrize("shape", ["circle", "square"])
@pytest.mark.parametrize("size", [7, 20, 44])
def test_footprint_side_bounds_the_pixels_any_draw_changes(shape, size):
    g = torch.Generator().manual_seed(size)
    # the largest scale of the default draw, and a range given high to low
    for t in (PatchTransform(), PatchTransform(scale_min=1.025, scale_max=1.025),
              PatchTransform(scale_min=1.05, scale_max=1.0)):
        spec = PatchSpec(size, shape, t)
        side = footprint_side(size, shape, t)
        assert spec.footprint_side == max(side, size)
        centers = sample_centers(256, 128, 128, side, "random", g)  # sub-pixel positions
        _, covered = spec.paste(torch.zeros(256, 3, 128, 128), torch.ones(3, size, size), centers, g)
        touched = (covered > 0).flatten(1).sum(1).max().item()
        assert touched <= side**2 < 1.6 * touched  # sound, and not vacuous


@pytest.mark.parametrize("shape", ["circle", "square"])
@pytest.mark.parametrize("size", [20, 40, 44, 81, 163])
def test_extent_side_holds_every_pixel_any_draw_changes(shape, size):
    """The receptive-field certificates' side: per axis, the span of the changed pixels never exceeds it, over many
    sub-pixel placements and draws of the transform; at the default transform it is reached within 2 px (not
    loose)."""
    g = torch.Generator().manual_seed(size)
    for t in (PatchTransform(), PatchTransform(rotation=30, scale_min=1.1, scale_max=0.9)):
        spec = PatchSpec(size, shape, t)
        side = spec.extent_side
        n = side + 8
        centers = n / 2 + torch.rand(96, 2, generator=g) * 2 - 1  # sub-pixel positions around the centre
        _, covered = spec.paste(torch.zeros(96, 3, n, n), torch.ones(3, size, size), centers, g)
        spans = [max(int(idx[-1] - idx[0]) + 1 for idx in (c.any(0).nonzero().flatten(), c.any(1).nonzero().flatten()))
                 for c in covered[:, 0] > 0]
        assert max(spans) <= side, (shape, size, t, max(spans), side)
        assert t != PatchTransform() or max(spans) >= side - 2, (shape, size, max(spans), side)


def test_the_extent_of_a_rotated_circle_exceeds_its_footprint():
    """The default 40 px circle has as many pixels as a 41 px square but spans 43: the measure the receptive-field
    certificates need is the extent."""
    spec = PatchSpec(40)
    assert (spec.footprint_side, spec.extent_side) == (41, 43)
    assert PatchSpec(20, "square", PatchTransform.none()).extent_side == 22  # 21 px, plus float32's slack


def test_footprint_of_an_untransformed_square_is_one_pixel_more_per_axis():
    # off the pixel grid, bilinear sampling reaches one extra row and column
    assert footprint_side(20, "square", PatchTransform.none()) == 21
    spec = PatchSpec(20, "square", PatchTransform.none())
    _, covered = spec.paste(torch.zeros(1, 3, 40, 40), torch.ones(3, 20, 20), torch.tensor([[20.3, 20.6]]))
    assert (covered > 0).sum().item() == 21 * 21


def test_brightness_shifts_the_patch_and_clips():
    images = torch.zeros(1, 3, 32, 32)
    patch = torch.full((3, 8, 8), 0.5)
    t = PatchTransform(rotation=0, scale_min=1, scale_max=1, brightness=0.05)
    out, _ = PatchSpec(8, "square", t).paste(images, patch, torch.tensor([[16.0, 16.0]]))
    shift = out[0, :, 12:20, 12:20] - 0.5
    assert shift.abs().max() <= 0.05 + 1e-6
    torch.testing.assert_close(shift, shift.flatten()[0].expand_as(shift))


def test_sweep_grid_keeps_the_patch_inside():
    grid = sweep_centers(100, 200, 40, 3)
    assert grid.tolist() == [[20, 20], [100, 20], [180, 20], [20, 50], [100, 50], [180, 50], [20, 80], [100, 80],
                             [180, 80]]


def test_patch_round_trip_and_bad_files(tmp_path):
    spec = PatchSpec(12, "circle", PatchTransform(rotation=3.0, scale_min=0.9), "random")
    patch, mask = torch.rand(3, 12, 12), spec.mask
    save_patch(tmp_path, patch, spec, {"note": "x"})
    back, back_spec = load_patch(tmp_path / "patch.pt")
    assert torch.equal(back, patch) and back_spec == spec
    # a patch.pt of an earlier version (size, shape, transform beside the tensor) still loads
    torch.save({"patch": patch, "mask": mask, "size": 12, "shape": "square", "transform": {"rotation": 2.0}},
               tmp_path / "old.pt")
    assert load_patch(tmp_path / "old.pt")[1] == PatchSpec(12, "square", PatchTransform(rotation=2.0))
    from PIL import Image

    with Image.open(tmp_path / "patch.png") as png:
        assert png.size == (12, 12)  # the printable patch: one image pixel per patch pixel
        real = torch.from_numpy(np.asarray(png.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255
    torch.testing.assert_close(real, patch * mask + 1 - mask, atol=1 / 255, rtol=0)
    with Image.open(tmp_path / "patch_x8.png") as view:
        assert view.size == ((12 + 2) * 8, (12 + 2) * 8)  # ×8 with one white patch pixel of margin all round
        big = torch.from_numpy(np.asarray(view.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255
    # nearest neighbour: every 8×8 block of the inside is one patch pixel; the red outline hugs the mask outside
    torch.testing.assert_close(big[:, 8:-8, 8:-8][:, ::8, ::8][:, 5:7, 5:7], real[:, 5:7, 5:7], atol=0, rtol=0)
    red = (big[0] > 0.8) & (big[1] < 0.05) & (big[2] < 0.05)
    outside = ~(torch.nn.functional.pad(mask, (1, 1, 1, 1)).repeat_interleave(8, 1).repeat_interleave(8, 2)[0] > 0)
    assert red.sum() > 4 * 12 * 2 and bool((red <= outside).all())  # a closed-ish line, never over the patch
    torch.save({"patch": torch.rand(1, 12, 12), "mask": mask}, tmp_path / "grey.pt")
    with pytest.raises(ToolkitError, match=r"does not hold a \(3, s, s\) patch"):
        load_patch(tmp_path / "grey.pt")
    with pytest.raises(ToolkitError, match="not found"):
        load_patch(tmp_path / "missing.pt")


def test_paper_patch_sides_and_bad_sizes():
    assert [patch_side(f) for f in (0.02, 0.04, 0.08, 0.16)] == [20, 40, 81, 163]
    with pytest.raises(ToolkitError, match=r"patch side 40 is larger than the images \(30×30\) \(30 px\)"):
        PatchSpec(40).paste(torch.rand(1, 3, 30, 30), torch.rand(3, 40, 40), torch.tensor([[15.0, 15.0]]))
    with pytest.raises(ToolkitError, match="does not match its spec"):
        PatchSpec(20).paste(torch.rand(1, 3, 30, 30), torch.rand(3, 10, 10), torch.tensor([[15.0, 15.0]]))
    for bad, message in (({"side": 10, "shape": "star"}, "unknown patch shape"), ({"side": 0}, "positive"),
                         ({"side": 10, "placement": "sweep"}, "sweep is for evaluation"),
                         ({"side": 10, "transform": {"scale_min": 0}}, "out of range")):
        with pytest.raises(ToolkitError, match=message):
            PatchSpec.from_dict(bad)

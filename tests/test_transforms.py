import torch

from datasets.transforms import multiple_size, random_crop_flip, random_erase, resize_to_multiple


def test_multiple_size_floors_but_never_below_one_multiple():
    assert multiple_size(182, 420, 4) == (180, 420)
    assert multiple_size(182, 420, 16) == (176, 416)
    assert multiple_size(10, 7, 16) == (16, 16)
    assert resize_to_multiple(torch.rand(3, 182, 421), 8).shape == (3, 176, 416)


def test_random_erase_replaces_one_rectangle_and_its_heads():
    image, density = torch.full((3, 64, 64), 0.5), torch.rand(64, 64)
    g = torch.Generator().manual_seed(0)
    out, den = random_erase(image, density, 1.0, g)
    changed = (out != image).any(0)
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    box = torch.zeros(64, 64, dtype=torch.bool)
    box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    assert torch.equal(changed, box)  # one rectangle, filled with noise in [0, 1)
    assert 8 <= len(rows) <= 32 and 8 <= len(cols) <= 32
    assert out.min() >= 0 and out.max() < 1
    assert torch.equal(den[box], torch.zeros(int(box.sum()))) and torch.equal(den[~box], density[~box])
    assert torch.equal(image, torch.full((3, 64, 64), 0.5))  # inputs untouched
    same, same_den = random_erase(image, density, 0.0, g)
    assert same is image and same_den is density


def test_uniform_crops_are_drawn_as_before_dense_crops_existed():
    image, density = torch.rand(3, 50, 70), torch.rand(50, 70)
    for seed in range(5):
        g, reference = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        top, left = (int(torch.randint(n - 32 + 1, (1,), generator=reference)) for n in (50, 70))
        flipped = bool(torch.rand((), generator=reference) < 0.5)
        expected = image[:, top:top + 32, left:left + 32]
        out, den = random_crop_flip(image, density, 32, generator=g, dense=0.0)
        window = density[top:top + 32, left:left + 32]
        assert torch.equal(out, expected.flip(-1) if flipped else expected)
        assert torch.equal(den, window.flip(-1) if flipped else window)


def test_dense_crops_are_drawn_around_heads_in_proportion_to_the_density():
    image, density = torch.rand(3, 200, 300), torch.zeros(200, 300)
    density[10, 20], density[150, 280] = 3.0, 1.0  # two heads far apart: no 64 px crop holds both
    g = torch.Generator().manual_seed(0)
    held = [random_crop_flip(image, density, 64, flip=False, generator=g, dense=1.0)[1].sum().item()
            for _ in range(2000)]
    assert set(held) == {1.0, 3.0}  # every crop holds a head
    assert abs(held.count(3.0) / len(held) - 0.75) < 0.03  # three times as often where three times the mass
    uniform = [random_crop_flip(image, density, 64, flip=False, generator=g)[1].sum().item() for _ in range(500)]
    assert uniform.count(0.0) > 400  # as the uniform draw mostly misses both
    empty = torch.zeros(200, 300)  # nothing to draw by: uniform, never an error
    assert random_crop_flip(image, empty, 64, generator=g, dense=1.0)[0].shape == (3, 64, 64)
    corner = torch.zeros(1, 40, 50)  # a head in the last pixel of an image smaller than the crop: padded, kept
    corner[0, 39, 49] = 1.0
    assert random_crop_flip(torch.rand(3, 40, 50), corner, 64, flip=False, generator=g, dense=1.0)[1].sum() == 1


def test_beyond_multinomials_limit_pixels_are_drawn_from_the_same_distribution(monkeypatch):
    from datasets import transforms

    weights = torch.tensor([0.0, 3.0, 0.0, 1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    small = [transforms._draw(weights, g) for _ in range(4000)]
    monkeypatch.setattr(transforms, "MULTINOMIAL_LIMIT", 3)  # as an image of more than 2^24 pixels
    large = [transforms._draw(weights, g) for _ in range(4000)]
    for drawn in (small, large):
        assert set(drawn) == {1, 3} and abs(drawn.count(1) / len(drawn) - 0.75) < 0.03


def test_a_rescaled_crop_is_a_window_of_side_size_over_scale_resized_with_its_heads_kept():
    import math

    import torch.nn.functional as F

    image, density = torch.rand(3, 120, 160), torch.rand(120, 160)
    for seed, (low, high) in enumerate([(0.5, 0.5), (2.0, 2.0), (0.7, 1.4)]):
        g, reference = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        u = float(torch.rand((), dtype=torch.float64, generator=reference))  # the scale, log-uniform in [low, high]
        side = round(32 / math.exp(math.log(low) + (math.log(high) - math.log(low)) * u))
        top, left = (int(torch.randint(n - side + 1, (1,), generator=reference)) for n in (120, 160))
        out, den = random_crop_flip(image, density, 32, flip=False, generator=g, scales=(low, high))
        window = image[None, :, top:top + side, left:left + side]
        expected = F.interpolate(window, size=(32, 32), mode="bilinear", align_corners=False, antialias=side > 32)[0]
        assert out.shape == (3, 32, 32) and den.shape == (32, 32)
        torch.testing.assert_close(out, expected)
        heads = density[top:top + side, left:left + side].sum(dtype=torch.float64)  # the window's count, kept
        torch.testing.assert_close(den.sum(dtype=torch.float64), heads, rtol=1e-5, atol=0)
    assert side == 24  # the last pair drew a scale other than 1 (seed 2: 1.32)

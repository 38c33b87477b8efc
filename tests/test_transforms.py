import torch

from datasets.transforms import multiple_size, random_erase, resize_to_multiple


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

import numpy as np
import pytest
import torch

from datasets.crowd import CrowdDataset
from datasets.density import density_map, downsample
from datasets.shanghaitech import ground_truth_file, load_image, read_points
from utils.errors import ToolkitError


@pytest.mark.parametrize("stride,multiple", [(4, 4), (8, 8), (16, 16), (1, 4)])
def test_whole_images_follow_the_model_size_rule(tiny_crowds, stride, multiple):
    ds = CrowdDataset(tiny_crowds / "test_data", stride, multiple, "fixed")
    for i in range(len(ds)):
        image, target, count = ds[i]
        h, w = image.shape[-2:]
        assert h % multiple == 0 and w % multiple == 0
        assert target.shape == (1, h // stride, w // stride)
        # the fixed kernel keeps every head's mass inside the image
        assert float(target.sum()) == pytest.approx(count, abs=1e-3)
        points = read_points(ground_truth_file(ds.images[i], ".mat"))
        assert count == len(points)


def test_crops_keep_the_density_of_their_window(tiny_crowds):
    torch.manual_seed(0)
    ds = CrowdDataset(tiny_crowds / "train_data", 4, 4, "adaptive", crop=64, flip=False)
    full = torch.from_numpy(density_map(ds._load(0)[1], (96, 128), "adaptive"))
    image, target, count = ds[0]
    assert image.shape == (3, 64, 64) and target.shape == (1, 16, 16)
    source = load_image(ds.images[0])
    # locate the window by matching pixels, then compare the pooled density of that window
    match = [(t, left) for t in range(33) for left in range(65)
             if torch.equal(source[:, t:t + 64, left:left + 64], image)]
    assert len(match) >= 1
    top, left = match[0]
    expected = downsample(full[top:top + 64, left:left + 64], 4)
    torch.testing.assert_close(target[0], expected)
    assert count == pytest.approx(float(expected.sum()), abs=1e-5)


def test_flip_moves_image_and_density_together(tiny_crowds):
    ds = CrowdDataset(tiny_crowds / "train_data", 1, 4, "fixed", crop=96, flip=True)
    source = load_image(ds.images[1])
    full = torch.from_numpy(density_map(ds._load(1)[1], (96, 128), "fixed"))
    outcomes = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        image, target, _ = ds[1]
        for left in range(33):
            window, den = source[:, :, left:left + 96], full[:, left:left + 96]
            for flipped in (False, True):
                if torch.equal(image, window.flip(-1) if flipped else window):
                    torch.testing.assert_close(target[0], den.flip(-1) if flipped else den)
                    outcomes.add(flipped)
    assert outcomes == {False, True}


def test_crops_are_a_function_of_seed_epoch_and_item(tiny_crowds):
    from torch.utils.data import DataLoader

    ds = CrowdDataset(tiny_crowds / "train_data", 4, 4, crop=32, erase=0.5)
    ds.set_epoch(3, seed=7)
    first = torch.stack([ds[i][0] for i in range(len(ds))])
    torch.manual_seed(123)  # the global RNG plays no part, nor the order items are read in
    assert torch.equal(torch.stack([ds[i][0] for i in reversed(range(len(ds)))]).flip(0), first)
    assert torch.equal(torch.cat([b[0] for b in DataLoader(ds, batch_size=2, num_workers=2)]), first)
    ds.set_epoch(4)
    assert not torch.equal(torch.stack([ds[i][0] for i in range(len(ds))]), first)
    ds.set_epoch(3, seed=8)
    assert not torch.equal(torch.stack([ds[i][0] for i in range(len(ds))]), first)


def test_h5_densities_are_read(tiny_crowds, tmp_path):
    import shutil

    from make_dataset import write_densities

    split = tmp_path / "test_data"
    shutil.copytree(tiny_crowds / "test_data", split)
    assert write_densities(split, "fixed") == 3
    a = CrowdDataset(split, 4, 4, "h5")
    b = CrowdDataset(split, 4, 4, "fixed")
    for i in range(len(a)):
        torch.testing.assert_close(a[i][1].sum(), b[i][1].sum(), atol=1e-3, rtol=0)


def _h5_copy(split, tmp_path, shrink: float = 1.0):
    """A copy of `split` with adaptive h5 densities, scaled by `shrink` (as a generator that loses border mass)."""
    import shutil

    import h5py

    from make_dataset import write_densities

    copy = tmp_path / split.name
    shutil.copytree(split, copy)
    write_densities(copy, "adaptive")
    for path in (copy / "ground_truth").glob("*.h5"):
        with h5py.File(path, "r+") as f:
            f["density"][...] = f["density"][...] * shrink
    return copy


@pytest.mark.parametrize("density", ["adaptive", "fixed", "h5"])
def test_whole_image_targets_sum_to_the_head_count_on_the_mini_set(shared_dir, tmp_path, density):
    """The count is the number of annotated heads inside the image whatever the density (an h5 map that lost 2 %
    of its mass included), and the target at the model's stride sums to it, so GAME(0) is the count error."""
    mini = shared_dir / "data" / "ShanghaiTech-mini"
    for split in (mini / "part_A_final" / "test_data", mini / "part_B_final" / "test_data"):
        root = _h5_copy(split, tmp_path / split.parent.name, shrink=0.98) if density == "h5" else split
        ds = CrowdDataset(root, 4, 4, density)
        for i in range(len(ds)):
            image, target, count = ds[i]
            points = read_points(ground_truth_file(ds.images[i], ".mat"), *load_image(ds.images[i]).shape[-2:])
            assert count == len(points), ds.images[i]
            assert float(target.sum(dtype=torch.float64)) == pytest.approx(count, abs=1e-3), ds.images[i]
        np.testing.assert_array_equal(ds.counts(), CrowdDataset(split, 4, 4, "adaptive").counts())


def test_h5_needs_the_points_too(tiny_crowds, tmp_path):
    split = _h5_copy(tiny_crowds / "test_data", tmp_path)
    mat = sorted((split / "ground_truth").glob("*.mat"))[0]
    mat.unlink()
    with pytest.raises(ToolkitError, match="no ground truth"):
        CrowdDataset(split, 4, 4, "h5")


def test_a_crop_larger_than_every_image_is_refused(tiny_crowds):
    assert CrowdDataset(tiny_crowds / "train_data", 4, 4, crop=96).crop == 96  # fits the 96×128 images
    with pytest.raises(ToolkitError, match="crop 100 is larger than every image .* at most 96 fits one"):
        CrowdDataset(tiny_crowds / "train_data", 4, 4, crop=100)


def test_bad_arguments(tiny_crowds, tmp_path):
    with pytest.raises(ToolkitError, match="crop must be a positive multiple"):
        CrowdDataset(tiny_crowds / "train_data", 8, 8, crop=60)
    with pytest.raises(ToolkitError, match="unknown density"):
        CrowdDataset(tiny_crowds / "train_data", 8, 8, density="gaussian")
    (tmp_path / "images").mkdir()
    img = (tiny_crowds / "train_data" / "images").iterdir().__next__()
    (tmp_path / "images" / img.name).write_bytes(img.read_bytes())
    with pytest.raises(ToolkitError, match="no ground truth"):
        CrowdDataset(tmp_path, 4, 4)

import numpy as np
import pytest
import torch

from datasets.density import KERNELS, adaptive_sigmas, density_map, downsample, reference_density_map
from utils.errors import ToolkitError

H, W = 48, 64  # not square, so a row/column swap shows


def _border_points() -> np.ndarray:
    """Heads on and near all four borders and corners, plus duplicates on one pixel."""
    eps = 1e-3
    corners = [[0, 0], [W - eps, 0], [0, H - eps], [W - eps, H - eps]]
    edges = [[0.4, 20.5], [W - 0.6, 11.2], [30.7, 0.2], [17.1, H - 0.3], [1.5, 1.5], [6.9, 7.2],
             [W - 7.5, H - 8.1]]
    duplicates = [[25.3, 30.8], [25.3, 30.8], [25.9, 30.1]]  # the third floors to the same pixel
    return np.array(corners + edges + duplicates, dtype=np.float64)


def _random_points(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform((0, 0), (W, H), (n, 2))


POINT_SETS = {
    "none": np.zeros((0, 2)),
    "one": np.array([[10.2, 33.9]]),
    "two": np.array([[10.2, 33.9], [50.5, 3.1]]),
    "three": np.array([[10.2, 33.9], [50.5, 3.1], [0.3, 47.6]]),
    "borders": _border_points(),
    "hundreds": np.concatenate([_random_points(300), _border_points()]),
}


def _gaussian_2d(rows: np.ndarray, cols: np.ndarray, sigma: float) -> np.ndarray:
    g = np.exp(-(rows[:, None] ** 2 + cols[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", POINT_SETS)
def test_fast_path_equals_reference(kernel, name):
    points = POINT_SETS[name]
    fast, ref = density_map(points, (H, W), kernel), reference_density_map(points, (H, W), kernel)
    assert fast.dtype == np.float32 and fast.shape == (H, W)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-6 * max(ref.max(), 1e-12))
    if name == "none":
        assert not fast.any()


@pytest.mark.parametrize("kernel", KERNELS)
def test_image_smaller_than_the_window(kernel):
    points = np.array([[0.5, 0.5], [4.2, 2.9], [8.9, 4.9]])
    fast, ref = density_map(points, (5, 9), kernel), reference_density_map(points, (5, 9), kernel)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-6 * ref.max())


def test_reference_fixed_interior_head_is_the_15x15_fspecial_kernel():
    ref = reference_density_map(np.array([[20.6, 30.2]]), (H, W), "fixed")
    # MATLAB pixel (row 30, col 20), 1-based, is 0-based (29, 19).
    expected = np.zeros((H, W))
    expected[22:37, 12:27] = _gaussian_2d(np.arange(-7, 8), np.arange(-7, 8), 4.0)
    np.testing.assert_allclose(ref, expected, rtol=0, atol=1e-7)


def test_reference_fixed_corner_head_is_a_fresh_gaussian_of_the_cropped_window():
    ref = reference_density_map(np.array([[0.5, 0.5]]), (H, W), "fixed")
    # The window keeps 8x8 pixels; the new kernel is centred on their middle (3.5), not on the head.
    expected = np.zeros((H, W))
    expected[:8, :8] = _gaussian_2d(np.arange(8) - 3.5, np.arange(8) - 3.5, 4.0)
    np.testing.assert_allclose(ref, expected, rtol=0, atol=1e-7)


def test_reference_adaptive_interior_heads_are_truncated_gaussians():
    # Four heads on a square of side 10: each sees neighbours at 10, 10 and 10*sqrt(2).
    corners = np.array([[45.5, 45.5], [55.5, 45.5], [45.5, 55.5], [55.5, 55.5]])
    sigma = 0.3 * (20 + 10 * np.sqrt(2)) / 3
    radius = int(4 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    expected = np.zeros((100, 100))
    for x, y in corners.astype(int):
        expected[y - radius:y + radius + 1, x - radius:x + radius + 1] += _gaussian_2d(taps, taps, sigma)
    ref = reference_density_map(corners, (100, 100), "adaptive")
    np.testing.assert_allclose(ref, expected, rtol=0, atol=1e-7)


def test_reference_adaptive_border_head_is_its_cut_gaussian_renormalised_inside_the_image():
    # Two heads 10 px apart, one in the corner: each has sigma 0.3 * 10 = 3, so the corner head's 25x25 window
    # keeps only its 13x13 quarter, scaled up to sum 1; the other head's window lies inside.
    points = np.array([[0.5, 0.5], [10.5, 0.5]])
    sigma, radius = 3.0, 12
    taps = np.arange(-radius, radius + 1)
    whole = _gaussian_2d(taps, taps, sigma)
    expected = np.zeros((40, 60))
    expected[:13, :13] += whole[radius:, radius:] / whole[radius:, radius:].sum()
    expected[:13, :23] += whole[radius:, 2:] / whole[radius:, 2:].sum()
    ref = reference_density_map(points, (40, 60), "adaptive")
    np.testing.assert_allclose(ref, expected, rtol=0, atol=1e-7)
    assert ref.sum(dtype=np.float64) == pytest.approx(2, abs=1e-6)


def test_adaptive_sigmas_hand_cases():
    np.testing.assert_allclose(adaptive_sigmas(np.array([3]), np.array([4]), (40, 60)), [12.5])
    np.testing.assert_allclose(adaptive_sigmas(np.array([0, 3]), np.array([0, 4]), (40, 60)), [1.5, 1.5])
    # Three heads on a line at 0, 3, 7: the mean over the two neighbours that exist.
    sig = adaptive_sigmas(np.array([0, 0, 0]), np.array([0, 3, 7]), (40, 60))
    np.testing.assert_allclose(sig, 0.3 * np.array([5.0, 3.5, 5.5]))
    # A duplicate is a neighbour at distance 0; five heads: the 3 nearest only.
    sig = adaptive_sigmas(np.array([0, 0, 0, 0, 0]), np.array([0, 0, 2, 6, 30]), (40, 60))
    np.testing.assert_allclose(sig, 0.3 * np.array([8, 8, 8, 16, 82]) / 3)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", POINT_SETS)
def test_every_kernel_sums_to_the_number_of_heads(kernel, name):
    """Heads on the border keep their whole mass inside the image, with either kernel."""
    points = POINT_SETS[name]
    assert density_map(points, (H, W), kernel).sum(dtype=np.float64) == pytest.approx(len(points), abs=1e-4)
    assert reference_density_map(points, (H, W), kernel).sum(dtype=np.float64) == pytest.approx(len(points), abs=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_sums_to_the_head_count_on_the_mini_set(shared_dir, kernel):
    """On every ShanghaiTech-mini image (many heads on the border), full-size and pooled to each model stride."""
    from datasets.shanghaitech import ground_truth_file, image_size, list_images, read_points

    mini = shared_dir / "data" / "ShanghaiTech-mini"
    images = [image for split in sorted(mini.glob("part_*/*_data")) for image in list_images(split)]
    assert len(images) == 19
    for image in images:
        h, w = image_size(image)
        points = read_points(ground_truth_file(image, ".mat"), h, w)
        density = density_map(points, (h, w), kernel)
        assert density.sum(dtype=np.float64) == pytest.approx(len(points), abs=1e-3), image
        for stride in (4, 8):
            assert downsample(density, stride).sum(dtype=np.float64) == pytest.approx(len(points), abs=1e-3)


def test_adaptive_interior_heads_sum_to_the_number_of_heads():
    points = np.random.default_rng(1).uniform(40, 88, (150, 2))
    rows, cols = np.floor(points[:, 1]).astype(int), np.floor(points[:, 0]).astype(int)
    assert (4 * adaptive_sigmas(rows, cols, (128, 128)) + 0.5).max() < 39  # every kernel inside the image
    assert density_map(points, (128, 128), "adaptive").sum(dtype=np.float64) == pytest.approx(150, abs=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_points_outside_the_image_are_ignored(kernel):
    inside = POINT_SETS["borders"]
    outside = np.array([[-0.1, 5], [W, 5], [5, H], [5, -383.0], [np.nan, 3], [W + 10, H + 10]])
    np.testing.assert_array_equal(density_map(np.concatenate([inside, outside]), (H, W), kernel),
                                  density_map(inside, (H, W), kernel))


def _block_sum(density: np.ndarray, stride: int) -> np.ndarray:
    h, w = density.shape
    out = np.zeros((-(-h // stride), -(-w // stride)))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = density[i * stride:(i + 1) * stride, j * stride:(j + 1) * stride].sum()
    return out


@pytest.mark.parametrize("shape", [(H, W), (50, 70), (13, 37)])
@pytest.mark.parametrize("stride", [4, 8, 16])
def test_downsample_keeps_the_sum_and_equals_block_sums(shape, stride):
    density = density_map(np.concatenate([_random_points(120, seed=2), _border_points()]), shape, "fixed")
    small = downsample(density, stride)
    assert small.dtype == np.float32
    np.testing.assert_allclose(small, _block_sum(density, stride), rtol=1e-6, atol=1e-7)  # float32 sums
    assert small.sum(dtype=np.float64) == pytest.approx(density.sum(dtype=np.float64), abs=1e-4)


def test_downsample_torch_with_batch_dims_matches_numpy():
    density = np.random.default_rng(3).random((2, 3, 50, 70)).astype(np.float32)
    small = downsample(torch.from_numpy(density), 8)
    assert isinstance(small, torch.Tensor) and small.shape == (2, 3, 7, 9)
    np.testing.assert_allclose(small.numpy(), downsample(density, 8), rtol=1e-6)
    np.testing.assert_allclose(small[1, 2].numpy(), _block_sum(density[1, 2], 8), rtol=1e-5)


@pytest.mark.parametrize("call", [
    lambda: density_map(np.zeros((1, 2)), (H, W), "gauss"),
    lambda: density_map(np.zeros((1, 2)), (0, W), "fixed"),
    lambda: density_map(np.zeros((1, 2)), (H, -3), "adaptive"),
    lambda: density_map(np.zeros((1, 2)), (H, 2.5), "adaptive"),
    lambda: density_map(np.zeros((4, 3)), (H, W), "fixed"),
    lambda: reference_density_map(np.zeros((1, 2)), (H, W), "gauss"),
    lambda: downsample(np.zeros((8, 8)), 0),
    lambda: downsample(np.zeros((8, 8)), 2.0),
    lambda: downsample(np.zeros(8), 2),
])
def test_bad_input_raises_toolkit_error(call):
    with pytest.raises(ToolkitError):
        call()

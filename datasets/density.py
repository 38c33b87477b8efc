"""Density maps from head points (MCNN `fixed`, CSRNet `adaptive`) and sum-exact downsampling.

Every head keeps its whole mass inside the image, so a map sums to the number of heads inside it (the ground
truth count) whatever the kernel: `fixed` is MCNN's generator, a fresh Gaussian on the 15×15 window cut by the
border; `adaptive` is CSRNet's truncated Gaussian, renormalised over the part of it that lies inside the image
(a head near the border has its kernel cut by the border and scaled up to sum 1; CSRNet's original loses that
mass). Renormalising the cut kernel, rather than mirroring or moving it, leaves every interior head unchanged and
keeps the mass where the kernel already puts it.

Both kernels are separable per head, and the cut of a separable kernel by the image rectangle is the product of
its cuts along each axis, so the fast path builds one row profile and one column profile per head, each
normalised over the image, and sums every head's outer product in a single matrix product.
`reference_density_map` is the slow per-head definition the fast path is tested and benchmarked against.
"""
import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from utils.errors import ToolkitError

KERNELS = ("fixed", "adaptive")
FIXED_SIZE, FIXED_SIGMA = 15, 4.0  # MATLAB fspecial('gaussian', 15, 4) in MCNN's generator
ADAPTIVE_BETA, ADAPTIVE_NEIGHBOURS, TRUNCATE = 0.3, 3, 4.0  # CSRNet: 0.3 x mean of 3 nearest, scipy default


def _check(points: np.ndarray, shape: tuple[int, int], kernel: str) -> tuple[np.ndarray, int, int]:
    """Validate the inputs; return the (N, 2) float64 points inside [0, W) x [0, H), and H, W."""
    if kernel not in KERNELS:
        raise ToolkitError(f"unknown density kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    if len(shape) != 2 or any(int(s) != s or s <= 0 for s in shape):
        raise ToolkitError(f"density map shape must be two positive integers, got {tuple(shape)}")
    h, w = int(shape[0]), int(shape[1])
    pts = np.asarray(points, dtype=np.float64)
    if pts.size == 0:
        pts = pts.reshape(0, 2)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ToolkitError(f"head points must be an (N, 2) array of (x, y), got shape {pts.shape}")
    # NaN fails every comparison, so it is dropped with the points outside the image.
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
    return pts[inside], h, w


def _head_pixels(points: np.ndarray, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    """0-based (rows, cols) per head: floor, but for `fixed` MATLAB's 1-based floor clipped to >= 1."""
    rows, cols = np.floor(points[:, 1]).astype(np.int64), np.floor(points[:, 0]).astype(np.int64)
    if kernel == "fixed":
        rows, cols = np.maximum(rows, 1) - 1, np.maximum(cols, 1) - 1
    return rows, cols


def adaptive_sigmas(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """CSRNet's sigma per head: 0.3 x mean distance to the 3 nearest other heads (fewer if fewer exist)."""
    n = len(rows)
    if n == 1:
        return np.array([np.mean(shape) / 4.0])
    if n == 0:
        return np.zeros(0)
    pixels = np.stack([rows, cols], axis=1).astype(np.float64)
    # Ask for the 2nd..kth nearest so the head itself (distance 0) is excluded; a duplicate still counts.
    dist, _ = cKDTree(pixels).query(pixels, k=list(range(2, min(n, ADAPTIVE_NEIGHBOURS + 1) + 1)))
    return ADAPTIVE_BETA * dist.mean(axis=1)


def _fixed_profiles(centres: np.ndarray, size: int) -> np.ndarray:
    """(N, size) MCNN profiles: the 15-tap window clipped to the image, a fresh Gaussian on what is left."""
    half = FIXED_SIZE // 2
    lo, hi = np.maximum(centres - half, 0), np.minimum(centres + half, size - 1)
    grid = np.arange(size)
    offsets = grid - (lo + hi)[:, None] / 2.0
    prof = np.exp(-offsets**2 / (2 * FIXED_SIGMA**2)) * ((grid >= lo[:, None]) & (grid <= hi[:, None]))
    return prof / prof.sum(axis=1, keepdims=True)


def _adaptive_profiles(centres: np.ndarray, sigmas: np.ndarray, size: int) -> np.ndarray:
    """(N, size) scipy `gaussian_filter1d` weights per head, clipped to the image and renormalised to sum 1 there.

    The weights are first normalised over the full radius, as scipy does, so an interior head's profile is exactly
    scipy's; the renormalisation changes only the heads whose kernel the border cuts."""
    radii = (TRUNCATE * sigmas + 0.5).astype(np.int64)
    # scipy skips an axis whose sigma <= 1e-15 (the identity); radius 0 with any sigma gives the same delta.
    radii[sigmas <= 1e-15] = 0
    scale = -0.5 / np.where(sigmas > 1e-15, sigmas, 1.0) ** 2
    taps = np.arange(-radii.max(initial=0), radii.max(initial=0) + 1)
    norm = (np.exp(scale[:, None] * taps**2) * (np.abs(taps) <= radii[:, None])).sum(axis=1)
    offsets = np.arange(size) - centres[:, None]
    prof = np.exp(scale[:, None] * offsets**2) * (np.abs(offsets) <= radii[:, None]) / norm[:, None]
    # the head's own tap (weight > 0) is always inside, so every sum is positive
    return prof / prof.sum(axis=1, keepdims=True)


def density_map(points: np.ndarray, shape: tuple[int, int], kernel: str = "adaptive") -> np.ndarray:
    """Float32 (H, W) density of `points` (N, 2) as (x, y); heads outside the image are ignored, and each head
    inside it adds exactly 1 (its kernel cut by the border and renormalised), so the map sums to their number."""
    pts, h, w = _check(points, shape, kernel)
    rows, cols = _head_pixels(pts, kernel)
    if kernel == "fixed":
        ky, kx = _fixed_profiles(rows, h), _fixed_profiles(cols, w)
    else:
        sigmas = adaptive_sigmas(rows, cols, (h, w))
        ky, kx = _adaptive_profiles(rows, sigmas, h), _adaptive_profiles(cols, sigmas, w)
    # Each head is the outer product of its row and column profiles; one product sums them all.
    return (ky.T @ kx).astype(np.float32)


def _fspecial_gaussian(rows: int, cols: int, sigma: float) -> np.ndarray:
    """MATLAB `fspecial('gaussian', [rows cols], sigma)`: centred 2-D Gaussian normalised to sum 1."""
    y, x = np.meshgrid(np.arange(rows) - (rows - 1) / 2, np.arange(cols) - (cols - 1) / 2, indexing="ij")
    g = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    g[g < np.finfo(np.float64).eps * g.max()] = 0
    return g / g.sum()


def reference_density_map(points: np.ndarray, shape: tuple[int, int], kernel: str = "adaptive") -> np.ndarray:
    """Slow per-head definition: a 2-D fspecial window cut by the border, or a whole-image gaussian_filter of the
    head's one-hot image divided by its sum (the kernel renormalised over the part inside the image), per head."""
    pts, h, w = _check(points, shape, kernel)
    rows, cols = _head_pixels(pts, kernel)
    density = np.zeros((h, w))
    if kernel == "fixed":
        half = FIXED_SIZE // 2
        for r, c in zip(rows, cols, strict=True):
            r0, r1, c0, c1 = max(r - half, 0), min(r + half, h - 1), max(c - half, 0), min(c + half, w - 1)
            density[r0:r1 + 1, c0:c1 + 1] += _fspecial_gaussian(r1 - r0 + 1, c1 - c0 + 1, FIXED_SIGMA)
    else:
        for r, c, sigma in zip(rows, cols, adaptive_sigmas(rows, cols, (h, w)), strict=True):
            one_hot = np.zeros((h, w))
            one_hot[r, c] = 1.0
            blurred = gaussian_filter(one_hot, sigma, mode="constant", truncate=TRUNCATE)
            density += blurred / blurred.sum()
    return density.astype(np.float32)


def downsample(density: np.ndarray | torch.Tensor, stride: int) -> np.ndarray | torch.Tensor:
    """Sum-pool (..., H, W) by `stride`, zero-padding the bottom/right edge so the total is kept."""
    if isinstance(stride, bool) or not isinstance(stride, int | np.integer) or stride < 1:
        raise ToolkitError(f"downsample stride must be a positive integer, got {stride!r}")
    if density.ndim < 2:
        raise ToolkitError(f"density must have shape (..., H, W), got {tuple(density.shape)}")
    h, w = density.shape[-2:]
    pad_h, pad_w = -h % stride, -w % stride
    if isinstance(density, torch.Tensor):
        padded = torch.nn.functional.pad(density, (0, pad_w, 0, pad_h))
    else:
        padded = np.pad(density, [(0, 0)] * (density.ndim - 2) + [(0, pad_h), (0, pad_w)])
    blocks = padded.reshape(*padded.shape[:-2], (h + pad_h) // stride, stride, (w + pad_w) // stride, stride)
    return blocks.sum((-3, -1))

"""Geometric transforms applied jointly to an image (3, H, W) and its density (H, W)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MULTINOMIAL_LIMIT = 2**24  # the most categories torch.multinomial draws from


def multiple_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The size a model's input rule asks for: each side floored to a multiple (never below one multiple)."""
    return max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple)


def resize_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Bilinear resize of (3, H, W) or (N, 3, H, W) to sides that are multiples of `multiple` (as MCNN's loader)."""
    size = multiple_size(image.shape[-2], image.shape[-1], multiple)
    if size == tuple(image.shape[-2:]):
        return image
    batch = image if image.dim() == 4 else image[None]
    out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
    return out if image.dim() == 4 else out[0]


def pad_to(image: torch.Tensor, density: torch.Tensor, height: int, width: int):
    """Zero-pad image and density at the bottom/right up to at least (height, width)."""
    pad_h, pad_w = max(0, height - image.shape[-2]), max(0, width - image.shape[-1])
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))
        density = F.pad(density, (0, pad_w, 0, pad_h))
    return image, density


def random_crop_flip(image: torch.Tensor, density: torch.Tensor, size: int, flip: bool = True,
                     generator: torch.Generator | None = None, dense: float = 0.0,
                     scales: tuple[float, float] | None = None):
    """A random `size`×`size` window of image and density (padded if smaller), flipped left-right with p=0.5.

    With probability `dense` the window is drawn around a pixel drawn by the density (a head, in proportion to how
    crowded its surroundings are) instead of uniformly: a counter that undercounts dense scenes sees more of them.
    With `scales` (low, high), the crop is seen at a scale drawn log-uniformly from them: a window of side
    size / scale, resized to `size` (its density keeps its sum, the heads in it)."""
    out = size
    if scales is not None:
        low, high = math.log(scales[0]), math.log(scales[1])
        scale = math.exp(low + (high - low) * float(torch.rand((), dtype=torch.float64, generator=generator)))
        size = max(1, round(out / scale))
    image, density = pad_to(image, density, size, size)
    h, w = image.shape[-2:]
    at = None
    if dense > 0 and float(torch.rand((), generator=generator)) < dense:
        weights = density.reshape(-1).clamp_min(0).double()
        at = _draw(weights, generator) if float(weights.sum()) > 0 else None  # nothing to draw by: uniform
    if at is not None:
        row, col = divmod(at, w)
        top = int(torch.randint(max(0, row - size + 1), min(row, h - size) + 1, (1,), generator=generator))
        left = int(torch.randint(max(0, col - size + 1), min(col, w - size) + 1, (1,), generator=generator))
    else:
        top = int(torch.randint(h - size + 1, (1,), generator=generator))
        left = int(torch.randint(w - size + 1, (1,), generator=generator))
    image = image[..., top:top + size, left:left + size]
    density = density[..., top:top + size, left:left + size]
    if size != out:
        image, density = resized(image, density, out)
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        image, density = image.flip(-1), density.flip(-1)
    return image, density


def resized(image: torch.Tensor, density: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (3, h, w) and density (h, w) resized to side × side (bilinear, antialiased when shrinking); the density
    rescaled to its own sum."""
    shrink = side < max(image.shape[-2:])
    image = F.interpolate(image[None], size=(side, side), mode="bilinear", align_corners=False, antialias=shrink)[0]
    new = F.interpolate(density[None, None].double(), size=(side, side), mode="bilinear", align_corners=False,
                        antialias=shrink)[0, 0]
    total, now = float(density.sum(dtype=torch.float64)), float(new.sum())
    return image, (new * (total / now) if now > 0 else new).to(density.dtype)


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """An index drawn in proportion to `weights`: torch.multinomial (the draws the released runs were trained
    with) up to its limit of 2^24 categories, inverse-CDF sampling of the same distribution beyond it."""
    if weights.numel() <= MULTINOMIAL_LIMIT:
        return int(torch.multinomial(weights, 1, generator=generator))
    mass = weights.cumsum(0)
    drawn = torch.rand((), dtype=torch.float64, generator=generator) * mass[-1]
    return min(int(torch.searchsorted(mass, drawn, right=True)), mass.numel() - 1)


def random_erase(image: torch.Tensor, density: torch.Tensor, p: float, generator: torch.Generator | None = None):
    """With probability p, replace a random rectangle (1/8 to 1/2 of each side) by uniform noise and remove the
    heads under it from the density: random erasing that teaches a counter that busy texture is not a crowd."""
    if p <= 0 or float(torch.rand((), generator=generator)) >= p:
        return image, density
    h, w = image.shape[-2:]
    eh = int(torch.randint(max(h // 8, 1), max(h // 2, 1) + 1, (1,), generator=generator))
    ew = int(torch.randint(max(w // 8, 1), max(w // 2, 1) + 1, (1,), generator=generator))
    top = int(torch.randint(h - eh + 1, (1,), generator=generator))
    left = int(torch.randint(w - ew + 1, (1,), generator=generator))
    image, density = image.clone(), density.clone()
    image[..., top:top + eh, left:left + ew] = torch.rand(*image.shape[:-2], eh, ew, generator=generator)
    density[..., top:top + eh, left:left + ew] = 0
    return image, density

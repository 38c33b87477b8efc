"""Randomized ablation: keep `keep` units of each image, chosen uniformly without replacement, and
set the rest to a fill value. A unit is one of the 3·H·W values (`element`, the paper's code) or one pixel with
its three channels (`pixel`, Levine & Feizi's colour version)."""
from __future__ import annotations

import torch

from utils.errors import ToolkitError

UNITS = ("element", "pixel")
FILL = 0.1307  # the paper's code (MNIST's mean); configurable


def units_per_image(shape: tuple[int, ...], unit: str) -> int:
    """d: the number of units of a (3, H, W) or (N, 3, H, W) image."""
    if unit not in UNITS:
        raise ToolkitError(f"unknown ablation unit {unit!r}; choose from {', '.join(UNITS)}")
    c, h, w = shape[-3:]
    return c * h * w if unit == "element" else h * w


def mean_units(sizes: list[tuple[int, int]], unit: str) -> int:
    """The mean d of images of (h, w) `sizes`: the whole image that a crop's share of kept units refers to."""
    return round(sum(units_per_image((3, h, w), unit) for h, w in sizes) / len(sizes))


def scaled_keep(keep: int, shape: tuple[int, ...], reference_units: int | None, unit: str = "element") -> int:
    """Units to keep in an input of `shape` (e.g. a crop) so that it keeps the share `keep / reference_units` of a
    whole image: the density of kept units, and so each one's weight in the count, stays the same."""
    d = units_per_image(shape, unit)
    if reference_units is None:
        return min(keep, d)
    return max(1, min(d, round(keep * d / reference_units)))


def sample_indices(d: int, keep: int, batch: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """(batch, keep) distinct indices in [0, d) per row, each row a uniform `keep`-subset.

    Few keep of many units: draw with replacement and redraw the repeats (expected keep²/2d of them), so the cost
    is O(keep log keep) per row. Many: the top-`keep` of d uniform keys, O(d). Never the O(keep²) of drawing one
    index at a time. Both are uniform because they treat every unit alike.
    """
    if not 0 < keep <= d:
        raise ToolkitError(f"keep must lie in 1..{d} (the number of units), got {keep}")
    where = generator.device if generator is not None else device
    if keep > d // 4:
        idx = torch.rand(batch, d, generator=generator, device=where).topk(keep, dim=1, sorted=False).indices
    else:
        idx = torch.randint(d, (batch, keep), generator=generator, device=where)
        while True:
            ordered, order = idx.sort(dim=1)
            repeat = ordered[:, 1:] == ordered[:, :-1]
            if not bool(repeat.any()):
                break
            # mark every copy after the first of a repeated value (back in the unsorted positions) and redraw it
            again = torch.zeros_like(idx, dtype=torch.bool).scatter(1, order[:, 1:], repeat)
            idx[again] = torch.randint(d, (int(again.sum()),), generator=generator, device=where)
    return idx.to(device) if device is not None else idx


def ablate(x: torch.Tensor, keep: int, unit: str = "element", fill: float = FILL,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Ablated copy of a batch (N, 3, H, W): each image keeps exactly `keep` units, the rest are `fill`.

    Differentiable with respect to the kept values, so attacks can take expectations over ablations.
    """
    n = x.shape[0]
    d = units_per_image(x.shape, unit)
    idx = sample_indices(d, keep, n, generator, x.device)
    flat = x.reshape(n, -1) if unit == "element" else x.reshape(n, x.shape[1], -1)
    if unit == "pixel":
        idx = idx.unsqueeze(1).expand(n, x.shape[1], keep)
    out = torch.full_like(flat, fill).scatter_(-1, idx, flat.gather(-1, idx))
    return out.view_as(x)

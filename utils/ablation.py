"""Randomized ablation: keep `keep` units of each image, chosen uniformly without replacement, and
set the rest to a fill value. A unit is one of the 3·H·W values (`element`, the paper's code) or one pixel with
its three channels (`pixel`, Levine & Feizi's colour version).

An `AblationSpec` holds the settings (keep, unit, fill, reference units), is built once, saved in the checkpoints of
ablation training, and read back by everything that ablates, smooths or certifies that model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from utils.errors import ToolkitError

UNITS = ("element", "pixel")
FILL = 0.1307  # the paper's code (MNIST's mean); configurable
KEEP = 45  # units kept per image in the paper's figures (its code's default: 100)


def units_per_image(shape: tuple[int, ...], unit: str) -> int:
    """d: the number of units of a (3, H, W) or (N, 3, H, W) image."""
    if unit not in UNITS:
        raise ToolkitError(f"unknown ablation unit {unit!r}; choose from {', '.join(UNITS)}")
    c, h, w = shape[-3:]
    return c * h * w if unit == "element" else h * w


def mean_units(sizes: list[tuple[int, int]], unit: str) -> int:
    """The mean d of images of (h, w) `sizes`: the whole image that a crop's share of kept units refers to."""
    return round(sum(units_per_image((3, h, w), unit) for h, w in sizes) / len(sizes))


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
    idx = sample_indices(units_per_image(x.shape, unit), keep, x.shape[0], generator, x.device)
    return ablate_at(x, idx, unit, fill)


def ablate_at(x: torch.Tensor, idx: torch.Tensor, unit: str = "element", fill: float = FILL) -> torch.Tensor:
    """Copy of a batch (N, 3, H, W) that keeps, per image, the units at its row of `idx` (N, keep) and sets the
    rest to `fill`: the same ablations applied to other images of the same shape (e.g. patched versions)."""
    n = x.shape[0]
    flat = x.reshape(n, -1) if unit == "element" else x.reshape(n, x.shape[1], -1)
    if unit == "pixel":
        idx = idx.unsqueeze(1).expand(n, x.shape[1], idx.shape[-1])
    out = torch.full_like(flat, fill).scatter_(-1, idx, flat.gather(-1, idx))
    return out.view_as(x)


@dataclass(frozen=True)
class AblationSpec:
    """Randomized ablation as a model is trained, smoothed and certified with it: `keep` units (k) of each whole
    image, of kind `unit`, the others set to `fill`. A crop keeps the share k / `reference_units` of its units (the
    mean d of the whole images the model is validated on), so each kept unit weighs in the count as it will on a
    whole image; without reference units a crop keeps min(k, d)."""

    keep: int
    unit: str = "element"
    fill: float = FILL
    reference_units: int | None = None

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ToolkitError(f"unknown ablation unit {self.unit!r}; choose from {', '.join(UNITS)}")
        if not isinstance(self.keep, int) or self.keep < 1:
            raise ToolkitError(f"keep must be a positive number of units, got {self.keep}")
        if not 0 <= self.fill <= 1:
            raise ToolkitError(f"the ablation fill must lie in [0, 1], got {self.fill}")
        if self.reference_units is not None and self.reference_units < 1:
            raise ToolkitError(f"reference units must be positive, got {self.reference_units}")

    def units(self, shape: tuple[int, ...]) -> int:
        """d: the number of units of a (3, H, W) or (N, 3, H, W) image."""
        return units_per_image(shape, self.unit)

    def check_fits(self, sizes: list[tuple[int, int]]) -> None:
        """The whole images of (h, w) `sizes` each have at least `keep` units."""
        fewest = min(self.units((3, h, w)) for h, w in sizes)
        if self.keep > fewest:
            raise ToolkitError(f"keep must lie in 1..{fewest} (the number of units of the smallest image), "
                               f"got {self.keep}")

    def crop_keep(self, shape: tuple[int, ...]) -> int:
        """Units to keep in a crop of `shape`: its share keep / reference_units of its own units."""
        d = self.units(shape)
        if self.reference_units is None:
            return min(self.keep, d)
        return max(1, min(d, round(self.keep * d / self.reference_units)))

    def ablate(self, x: torch.Tensor, generator: torch.Generator | None = None, crop: bool = False) -> torch.Tensor:
        """A fresh ablation of every image of the batch `x` (N, 3, H, W): `keep` units of a whole image (at most
        its d), or the crop's share with `crop`."""
        keep = self.crop_keep(x.shape) if crop else min(self.keep, self.units(x.shape))
        return ablate(x, keep, self.unit, self.fill, generator)

    def indices(self, shape: tuple[int, ...], samples: int, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
        """(samples, k) unit indices of `samples` independent, uniform ablations of a whole image of `shape`, for
        `ablate_at` (drawn at once: the same as `counts` draws them where `samples` fits one of its batches)."""
        d = self.units(shape)
        return sample_indices(d, min(self.keep, d), samples, generator, device)

    def pixels(self, idx: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The pixel (y·W + x) of each unit index of an image of `shape`."""
        return idx % (shape[-2] * shape[-1]) if self.unit == "element" else idx

    def ablate_at(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The ablations of rows `idx` (from `indices`) applied to the batch `x`, one row per image."""
        return ablate_at(x, idx, self.unit, self.fill)

    @torch.no_grad()
    def counts(self, model, image: torch.Tensor, samples: int, batch_size: int = 64,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The model's counts of `samples` independent ablations of one whole image (3, H, W), in batched forward
        passes: the samples the smoothed count and its certificate are made of."""
        if samples < 1:
            raise ToolkitError(f"the number of samples must be at least 1, got {samples}")
        counts = []
        for start in range(0, samples, batch_size):
            n = min(batch_size, samples - start)
            counts.append(model(self.ablate(image.expand(n, *image.shape), generator)).float().sum(dim=(1, 2, 3)))
        return torch.cat(counts).float()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AblationSpec:
        return cls(int(d["keep"]), d.get("unit", "element"), float(d.get("fill", FILL)), d.get("reference_units"))

    @classmethod
    def from_checkpoint(cls, state: dict) -> AblationSpec | None:
        """The spec an ablation-trained checkpoint records (older ones: their keep, unit and fill arguments), or
        None for a model not trained with ablation."""
        if "ablation" in state:
            return cls.from_dict(state["ablation"])
        args = state.get("args", {})
        return cls.from_dict(args) if args.get("keep") is not None else None

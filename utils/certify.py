"""Certified count bounds of the median-smoothed counter against a patch placed anywhere.

A random ablation misses a patch of ρ units with probability C(d−ρ, k)/C(d, k); Δ = 1 − that bounds the total
variation between the clean and attacked ablated-count distributions, so the attacked population median lies in
[q(0.5−Δ), q(0.5+Δ)] of the clean one; order statistics of N samples bound those quantiles at confidence 1−α.
"""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from scipy.stats import binom
from torch import nn

from datasets.crowd import EqualSizeBatches
from models.receptive_field import GlobalFieldError
from utils import distributed
from utils.ablation import AblationSpec
from utils.errors import ToolkitError
from utils.local_eval import LocalSmoothedCounter
from utils.metrics import summarize
from utils.patch import PatchSpec
from utils.runtime import autocast, derived_seed, progress


def _log_comb_ratio(top: float, d: float, k: float) -> float:
    """log C(top, k)/C(d, k), with log Γ so that d can reach 10^8; −inf when top < k."""
    if top < k:
        return -math.inf
    return (math.lgamma(top + 1) - math.lgamma(top - k + 1)) - (math.lgamma(d + 1) - math.lgamma(d - k + 1))


def miss_probability(d: int, rho: int, k: int) -> float:
    """C(d−ρ, k)/C(d, k): no kept unit falls in the patch (the paper's "upper bound possibility")."""
    _check(d, rho, k)
    return math.exp(_log_comb_ratio(d - rho, d, k))


def inside_probability(d: int, rho: int, k: int) -> float:
    """C(ρ, k)/C(d, k): every kept unit falls in the patch (the paper's "lower bound possibility")."""
    _check(d, rho, k)
    return math.exp(_log_comb_ratio(rho, d, k))


def delta(d: int, rho: int, k: int) -> float:
    """Δ(d, ρ, k) = 1 − C(d−ρ, k)/C(d, k), accurate also when it is tiny."""
    _check(d, rho, k)
    return -math.expm1(_log_comb_ratio(d - rho, d, k))


def patch_units(side: int, unit: str, channels: int = 3) -> int:
    """ρ: units covered by a side×side patch (3s² elements or s² pixels)."""
    return channels * side * side if unit == "element" else side * side


def _check(d: int, rho: int, k: int) -> None:
    if not 0 < k <= d:
        raise ToolkitError(f"keep must lie in 1..{d} (the number of units), got {k}")
    if not 0 <= rho <= d:
        raise ToolkitError(f"a patch of {rho} units does not fit an image of {d} units")


def order_statistic_indices(n: int, delta_: float, alpha: float) -> tuple[int, int] | None:
    """1-based (l, u) with Y(l) ≤ q(0.5−Δ) and Y(u) ≥ q(0.5+Δ) each with probability ≥ 1 − α/2; None if no such pair.

    l is the largest index with BinomCDF(l−1; n, 0.5−Δ) ≤ α/2; u the smallest with BinomCDF(u−1; n, 0.5+Δ) ≥ 1−α/2.
    """
    if not 0 < alpha < 1:
        raise ToolkitError(f"alpha must lie in (0, 1), got {alpha}")
    if n < 1:
        raise ToolkitError(f"the number of samples must be at least 1, got {n}")
    lo, hi = 0.5 - delta_, 0.5 + delta_
    if lo <= 0 or hi >= 1:
        return None
    below = np.flatnonzero(binom.cdf(np.arange(n), n, lo) <= alpha / 2)  # candidates l − 1 = 0 .. n − 1
    above = np.flatnonzero(binom.cdf(np.arange(n), n, hi) >= 1 - alpha / 2)
    if len(below) == 0 or len(above) == 0:
        return None
    return int(below[-1]) + 1, int(above[0]) + 1


def certified_interval(samples: np.ndarray, delta_: float, alpha: float) -> tuple[float, float]:
    """[L, U] from the sorted clean ablated counts; (nan, nan) where the image is not certified."""
    ys = np.sort(np.asarray(samples, dtype=np.float64))
    idx = order_statistic_indices(len(ys), delta_, alpha)
    if idx is None:
        return math.nan, math.nan
    return float(ys[idx[0] - 1]), float(ys[idx[1] - 1])


def require_eval(model) -> None:
    """A certificate holds for a model whose every image is counted alone: not for one in training mode, where batch
    norm mixes the images of a batch (and dropout draws)."""
    if isinstance(model, nn.Module) and any(m.training for m in model.modules()):
        raise ToolkitError(f"{getattr(model, 'name', type(model).__name__)} is in training mode: certificates hold "
                           "for a model in eval mode only (batch norm would mix the images of a batch); call .eval()")


class Certifier:
    """A certified counter: per image its count and, for each patch side s asked, an interval [L, U] that holds the
    count under any patch within an s×s square placed anywhere (a counter per side where `count_per_side`).

    `certify_batch(model, images, sides)` returns one row per image: `count` (or `count{s}`), `L{s}`, `U{s}`
    (NaN where the image is not certified) and whatever else the method reports. `side_measure` says which side of a
    `PatchSpec` a certificate against the toolkit's patch must cover (`covered_side`).
    """

    method = ""
    count_per_side = False
    batched = True  # whole images of one size are certified together
    side_measure = "footprint"  # the side of a square with as many pixels as the patch can change (units counted)

    @classmethod
    def covered_side(cls, spec: PatchSpec) -> int:
        """The side s to certify so that the certificate holds for every paste of `spec`'s patch."""
        return spec.footprint_side if cls.side_measure == "footprint" else spec.extent_side

    def certify_batch(self, model, images: torch.Tensor, sides: list[int]) -> list[dict]:
        raise NotImplementedError

    def settings(self) -> dict:
        """What the certificate depends on, recorded beside its results."""
        return {"method": self.method}

    def key(self, index: int) -> None:
        """Draw what is random for image `index` of a split from a stream of its own (no-op when nothing is)."""

    def density(self, model, images: torch.Tensor, side: int) -> torch.Tensor:
        """The counter for patches of `side` as a density map whose sum per image is its count: a model to evaluate
        attacks on."""
        raise NotImplementedError

    def attack_density(self, model, images: torch.Tensor, side: int) -> torch.Tensor:
        """What an attack on the counter descends through (differentiable): by default the counter's density."""
        return self.density(model, images, side)

    @torch.no_grad()
    def counts(self, model, images: torch.Tensor, side: int) -> torch.Tensor:
        """The certified counter's count of each image (the counter for patches of `side`, where that matters): what
        its certificate bounds, e.g. on an attacked image."""
        require_eval(model)
        rows = self.certify_batch(model, images, [side])
        return torch.tensor([r.get(f"count{side}", r.get("count")) for r in rows], dtype=torch.float64)


class AblationCertifier(Certifier):
    """Randomized ablation: the median of the model's count over `samples` ablations as `spec` says; Δ bounds how
    far a patch of ρ units can move their distribution, so the attacked median lies in [L, U] with confidence
    1 − `alpha`."""

    method = "ablation"
    batched = False

    def __init__(self, spec: AblationSpec, samples: int, alpha: float = 0.05, batch_size: int = 64,
                 generator: torch.Generator | None = None, eot: int = 2, seed: int | None = None):
        self.spec, self.samples, self.alpha = spec, samples, alpha
        self.batch_size, self.generator, self.eot, self.seed = batch_size, generator, eot, seed

    def key(self, index: int) -> None:
        """With a `seed`, image `index`'s ablations come from (`seed`, `index`): the same in any order or shard."""
        if self.seed is not None and self.generator is not None:
            self.generator.manual_seed(derived_seed(self.seed, index))

    @torch.no_grad()
    def density(self, model, images: torch.Tensor, side: int | None = None) -> torch.Tensor:
        """The smoothed counter as a one-cell density per image: the median of `samples` ablated counts."""
        counts = [self.spec.counts(model, image, self.samples, self.batch_size, self.generator).quantile(0.5)
                  for image in images]
        return torch.stack(counts).view(-1, 1, 1, 1)

    def local_counter(self, model, side: int | None = None):
        """`density(model, ·)` that evaluates a placement sweep locally (`LocalSmoothedCounter`) where the model's
        field is bounded, else `density` itself."""
        try:
            return LocalSmoothedCounter(model, self.spec, self.samples, self.generator, self.batch_size)
        except GlobalFieldError:
            return partial(self.density, model)

    def attack_density(self, model, images: torch.Tensor, side: int | None = None) -> torch.Tensor:
        """The expectation over ablations an attack descends: `eot` fresh ablations of each image (a crop keeps its
        share of k)."""
        return model(self.spec.ablate(images.repeat_interleave(self.eot, dim=0), self.generator, crop=True))

    def certify_batch(self, model, images: torch.Tensor, sides: list[int]) -> list[dict]:
        rows = []
        for image in images:
            ys = self.spec.counts(model, image, self.samples, self.batch_size, self.generator).cpu().numpy()
            d, row = self.spec.units(image.shape), {"count": float(np.median(ys))}
            for s in sides:
                row[f"L{s}"], row[f"U{s}"] = certified_interval(
                    ys, delta(d, patch_units(s, self.spec.unit), self.spec.keep), self.alpha)
            rows.append(row)
        return rows

    def settings(self) -> dict:
        return {"method": self.method, **self.spec.to_dict(), "samples": self.samples, "alpha": self.alpha}


@torch.no_grad()
def certify_split(certifier: Certifier, model, dataset, sides: list[int], device: torch.device | None = None,
                  amp: bool = True, batch_size: int = 4) -> tuple[list[dict], dict]:
    """Per image of `dataset` the certified counter's count and [L, U] per side; plus the summary (`summarize`).
    Under torchrun each rank certifies its share of the images and every rank gets all the rows."""
    device = device or torch.device("cpu")
    require_eval(model)
    rows = []
    batches = EqualSizeBatches(dataset, batch_size if certifier.batched else 1, shard=True)
    for index, (images, _, gt) in progress(batches, certifier.method):
        if not certifier.batched:
            certifier.key(index[0])
        with autocast(device, amp):
            results = certifier.certify_batch(model, images.to(device), sides)
        rows += [{"index": i, "image": dataset.names[i], "gt": float(gt[j]), **r}
                 for j, (i, r) in enumerate(zip(index, results, strict=True))]
    rows = distributed.gather(rows, key=lambda r: r["index"])
    return rows, {**certifier.settings(), **summarize_certificates(rows, sides)}


def certify_patches(certifier: Certifier, model, dataset, specs: dict[int, PatchSpec],
                    device: torch.device | None = None, amp: bool = True, batch_size: int = 4
                    ) -> tuple[list[dict], dict]:
    """`certify_split` against the toolkit's patches `specs` (nominal side: spec), each certified at the side its
    certifier must cover (`Certifier.covered_side`); rows and per-side metrics keyed by the nominal side, the metrics
    recording the side certified, which measure it is and both measures."""
    cover = {s: certifier.covered_side(spec) for s, spec in specs.items()}
    rows, metrics = certify_split(certifier, model, dataset, sorted(set(cover.values())), device, amp, batch_size)
    metrics["patch_sizes"] = {
        str(s): {"certified_side": c, "side_measure": certifier.side_measure, "extent_side": specs[s].extent_side,
                 "footprint_side": specs[s].footprint_side, **metrics["patch_sizes"][str(c)]}
        for s, c in cover.items()}
    rows = nominal_rows(rows, cover)
    sizes = dataset.sizes()
    for row in rows:  # the floor of the nominal square: no counter can do better than lose the heads it covers
        points = dataset.head_points(row["index"])
        row.update({f"floor{s}": most_heads_in_square(points, sizes[row["index"]], s) for s in specs})
    for s in specs:
        metrics["patch_sizes"][str(s)]["floor"] = float(np.mean([r[f"floor{s}"] for r in rows]))
    return rows, metrics


def nominal_rows(rows: list[dict], cover: dict[int, int]) -> list[dict]:
    """Rows of `certify_batch` (keyed by the sides certified) keyed by the nominal patch sides instead; `cover` maps
    each nominal side to the side certified for it (`Certifier.covered_side`)."""
    per_side = ("count", "L", "U", "hide", "add")
    certified = {f"{key}{c}" for c in cover.values() for key in per_side}
    return [{**{k: v for k, v in row.items() if k not in certified},
             **{f"{key}{s}": row[f"{key}{c}"] for s, c in cover.items() for key in per_side if f"{key}{c}" in row}}
            for row in rows]


def most_heads_in_square(points: np.ndarray, shape: tuple[int, int], side: int) -> int:
    """The most head points (N, 2) as (x, y) inside any axis-aligned side×side square of pixels of an image of
    `shape`: the floor of any certified counter's worst error there, since a patch can cover them (a box filter over
    the map of heads per pixel, from its integral image)."""
    h, w = shape
    cols, rows = (np.clip(points[:, k].astype(np.int64), 0, n - 1) for k, n in ((0, w), (1, h)))
    heads = np.zeros((h + 1, w + 1))
    np.add.at(heads, (rows + 1, cols + 1), 1)
    c = heads.cumsum(0).cumsum(1)
    kh, kw = min(side, h), min(side, w)
    return int(round((c[kh:, kw:] - c[:-kh, kw:] - c[kh:, :-kw] + c[:-kh, :-kw]).max()))


def counts_for(rows: list[dict], side: int) -> list[float]:
    """The certified counter's count of each row for patches of `side` (its own counter, where it has one)."""
    return [r.get(f"count{side}", r.get("count")) for r in rows]


def summarize_certificates(rows: list[dict], sides: list[int]) -> dict:
    """`counter`: clean MAE / RMSE of the certified counter (None where each side has its own); per side its
    counter's clean `mae` / `rmse`, `certified_fraction`, `tight_mae` / `tight_rmse` (the mean / root mean square
    over certified images of the worst error inside [L, U], max(|L − c|, |U − c|)) and `mean_width`."""
    gt = [r["gt"] for r in rows]
    single = all("count" in r for r in rows)
    out = {"counter": summarize([r["count"] for r in rows], gt) if single else None, "patch_sizes": {}}
    for s in sides:
        certified = [r for r in rows if not math.isnan(r[f"L{s}"])]
        worst = np.array([max(abs(r[f"L{s}"] - r["gt"]), abs(r[f"U{s}"] - r["gt"])) for r in certified])
        out["patch_sizes"][str(s)] = {
            **summarize(counts_for(rows, s), gt),
            "certified_fraction": len(certified) / len(rows),
            "tight_mae": float(worst.mean()) if len(worst) else math.nan,
            "tight_rmse": float(np.sqrt((worst**2).mean())) if len(worst) else math.nan,
            "mean_width": float(np.mean([r[f"U{s}"] - r[f"L{s}"] for r in certified])) if certified else math.nan}
        if not certified:  # metrics.json writes the missing figures as null: say why beside them
            out["patch_sizes"][str(s)]["note"] = ("no image certified at this side: tight_mae, tight_rmse and "
                                                  "mean_width do not exist")
    return out


def bound_table(d: int, keep: int, sides: list[int], unit: str = "element") -> list[dict]:
    """The paper's upper / lower bound possibilities per patch side."""
    return [{"side": s, "rho": patch_units(s, unit), "upper": miss_probability(d, patch_units(s, unit), keep),
             "lower": inside_probability(d, patch_units(s, unit), keep)} for s in sides]

"""Deterministic receptive-field certificates of a counting network, from one forward pass.

A convolutional counter's output cell sees only its receptive field (R pixels wide, stride t), so a patch of any
content inside an s×s square can change only the cells of one w×w window, w = `ReceptiveField.window(s)`; every
other cell keeps its clean value. With S_w the sums of the clean density over all w×w windows and T the total:

- rf-clip: the counter C = Σ clamp(d, 0, dmax). The window's cells stay in [0, dmax] under attack, so
  C' ∈ [C − max S_w, C + max (dmax·|w| − S_w)] (S on the clipped map).
- rf-mask: the counter M = a·u + c with u = T − max S_w, the count outside the densest window (d clamped to
  [0, `CELL_CAP`]), and a ≥ 0, c constants per side. With w* a window of the map holding every cell the patch
  reaches (one exists: the reach spans at most w cells per axis, a window min(w, side)): max S' ≥ S'_{w*} gives
  u' ≤ T − S_{w*} ≤ T − min S. Below: T' = T − S_{w*} + S'_{w*}, and for every window w the attacked cells of w lie
  in w ∩ w*, whose attacked sum is at most S'_{w*} (cells ≥ 0), so S'_w ≤ S_w − S_{w∩w*} + S'_{w*} and
  u' = T' − max_w S'_w ≥ T − max_w (S_{w*} + S_w − S_{w∩w*}) = T − max_w S_{w∪w*} ≥ T − P, with P the most mass in
  the union of any two windows (`densest_pair`; P ≤ 2 max S). M is non-decreasing in u, so
  M' ∈ [a(T − P) + c, a(T − min S) + c]. Both ends are attained by some values of the reached cells (what a real
  network lets a patch write is narrower): making the sparsest window the densest gives u' = T − min S; writing a
  large mass into w ∩ w* for the pair (w, w*) of P (or zeroing w* when the two are disjoint) gives u' = T − P.
  The refill M − u = (a − 1)u + c depends on the image (through u) and is bounded by the same proof.

Both hold for every placement and every patch content, with no probability of failure. dmax (a high quantile of the
cells) and a, c come from a train split (`calibrate`): the `constant` refill is a = 1 with c the mean of max S_w; the
`fitted` one is the (a ≥ 0, c) minimising the sum over the train images of the certified error
max(|L − gt|, |U − gt|), a linear programme (`fit_refill`), which also undoes a uniform under- or overcount; the
`validated` one takes per side whichever of the two certifies the split's held-out tenth better.

The side s certified is the patch's extent (`PatchSpec.extent_side`): every pixel the toolkit's patch can change, under
every rotation, scale, sub-pixel placement and its bilinear rim, lies in one axis-aligned s×s square. The certified
counts are computed in float32 (no autocast, no TF32: `utils.runtime.float32`), and each interval is widened by
`FLOAT_TOLERANCE` × (T + 1), times a where a > 1: the cells a patch cannot reach keep their clean values only up to
float rounding, which differs with the batch an image is counted in (measured: about 1e-9 relative for MCNN between
batches of 1 and 48). rf-mask's count itself sums the cells outside the window rather than subtracting max S from
T, which cancels on an attacked map with a few huge cells.

Both counters count each cell of the model's density as clamped to [0, `CELL_CAP`] (rf-clip: [0, dmax]), NaN as the
cap: whatever a patch makes the network write, every cell stays finite and the proofs above hold as written. The cap
also keeps the float64 window sums of an attacked map at most T + `CELL_CAP`·|window|, so their rounding cannot hide
one reached cell beside another: rf-mask's argmax then picks a window at least as dense as w*, up to far less than
the widening (uncapped, 1e30 and 1e13 in one window rounded to the sum of 1e30 alone, and the first window holding
the 1e30 cell, not the 1e13 one, was masked: a count of 1.3e13 above U).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datasets.crowd import VALIDATION_SHARE, CrowdDataset, EqualSizeBatches, held_out
from models.receptive_field import ReceptiveField
from utils import distributed
from utils.certify import Certifier, require_eval
from utils.errors import ToolkitError
from utils.io import save_json
from utils.local_eval import LocalCounter
from utils.runtime import autocast, float32, progress

DMAX_QUANTILE = 0.999
# rf-mask's (a, c): a = 1 and a mean (default), fitted on the split, or per side whichever of the two certifies the
# split's held-out tenth better
REFILLS = ("constant", "fitted", "validated")
PAIR_CHUNK = 1 << 23  # float64 elements per step of `densest_pair` (64 MiB)
FLOAT_TOLERANCE = 1e-5  # relative to the clean count: 10^4 times the rounding measured across batch sizes
# the most people the certified counters count in one output cell (a cell covers 16 to 64 px²): far above any crowd,
# and finite
CELL_CAP = 1e3


def bounded(density: torch.Tensor, high: float = CELL_CAP) -> torch.Tensor:
    """`density` with every cell in [0, `high`], NaN counted as `high`: what the certified counters count."""
    return density.nan_to_num(nan=high).clamp(0, high)


def integral_image(density: torch.Tensor) -> torch.Tensor:
    """(N, h + 1, w + 1) float64 cumulative sums of `density` (N, 1, h, w), with a zero first row and column."""
    return F.pad(density.double()[:, 0], (1, 0, 1, 0)).cumsum(1).cumsum(2)


def window_sums(density: torch.Tensor, w: int, integral: torch.Tensor | None = None) -> torch.Tensor:
    """(N, h', w') sums of `density` (N, 1, h, w) over every w×w window inside the map (w clipped to the map's
    sides: then a window spans that whole side), from the integral image (`integral`, if already computed), so the
    cost does not grow with w."""
    kh, kw = min(w, density.shape[-2]), min(w, density.shape[-1])
    c = integral_image(density) if integral is None else integral
    return c[:, kh:, kw:] - c[:, :-kh, kw:] - c[:, kh:, :-kw] + c[:, :-kh, :-kw]


def _running_max(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """out[..., j] = max of x[..., j + before .. j + after] along the last axis (−inf where that is empty)."""
    n = x.shape[-1]
    padded = F.pad(x, (max(0, -before), max(0, after)), value=-torch.inf)
    start = before + max(0, -before)
    return padded[..., start:start + n + after - before].unfold(-1, after - before + 1, 1).amax(-1)


def densest_pair(density: torch.Tensor, w: int, integral: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) the most mass of `density` (N, 1, h, w') in the union of two w×w windows inside the map (the same
    window twice included; w clipped to the map's sides as in `window_sums`), and (N,) the flat index, in
    `window_sums`' layout, of one window of a pair that has it.

    Disjoint pairs come from running maxima of the window sums per row and per column of windows. An overlapping
    pair p = (i, j), q = (i + di, j + dj), 0 ≤ di < kh, shares the rows i + di .. i + kh − 1 (their column sums
    up to column m: R[m]) and the columns j + max(dj, 0) .. j + kw + min(dj, 0) − 1, so its union is
    S_p + (S_q − R[j + kw] + R[j + dj]) for dj ≥ 0 and S_p + (R[j] + S_q − R[j + dj + kw]) for dj < 0: per di, a
    running maximum over dj of a term in j + dj alone, for as many di at once as `PAIR_CHUNK` allows (a few kernels
    per side on a GPU)."""
    integral = integral_image(density) if integral is None else integral
    sums = window_sums(density, w, integral)
    n, rows, cols = sums.shape
    kh, kw = min(w, density.shape[-2]), min(w, density.shape[-1])
    best, at = sums.flatten(1).max(dim=1)

    def keep(value: torch.Tensor, where: torch.Tensor) -> None:
        nonlocal best, at
        better = value > best
        best, at = torch.where(better, value, best), torch.where(better, where, at)

    for dim, k in ((2, kh), (1, kw)):  # pairs apart along rows (first), then along columns, of windows
        line = sums.amax(dim)
        if line.shape[1] > k:
            value, first = (line + _running_max(line, k, line.shape[1])).max(dim=1)
            picked = sums[torch.arange(n), first] if dim == 2 else sums[torch.arange(n), :, first]
            other = picked.argmax(dim=1)
            keep(value, first * cols + other if dim == 2 else other * cols + first)
    # q = p + (di, dj) with 0 ≤ di < kh (a pair in either order is one pair), only for the rows of p where S_p + max S
    # can beat the best pair so far (their union is at most that: on a real crowd a few rows), row offsets in chunks
    # of bounded memory
    live = (sums.amax(2) + sums.flatten(1).amax(1, keepdim=True) > best[:, None]).any(0).nonzero().flatten()
    if not len(live):  # e.g. a map of zeros
        return best, at
    step = max(1, PAIR_CHUNK // max(1, n * len(live) * (cols + kw)))
    bottom = integral[:, kh + live, None]  # R = bottom − (integral's row i + di): (N, live rows, offsets, columns + 1)
    padded = F.pad(sums, (0, 0, 0, kh), value=-torch.inf)  # q below the last row of windows: no pair
    top = sums[:, live, None]
    for di in range(0, min(kh, rows), step):  # offsets di .. di + offsets − 1 at once
        offsets = min(step, kh - di, rows - di)
        below = live[:, None] + di + torch.arange(offsets, device=live.device)  # q's rows: (live rows, offsets)
        shared, q = bottom - integral[:, below], padded[:, below]
        union = top - shared[..., kw:] + _running_max(q + shared[..., :cols], 0, kw - 1)  # dj ≥ 0
        if kw > 1:  # dj < 0
            union = torch.maximum(union, top + shared[..., :cols] + _running_max(q - shared[..., kw:], 1 - kw, -1))
        value, where = union.flatten(1).max(dim=1)
        keep(value, live[where // (offsets * cols)] * cols + where % cols)
    return best, at


@dataclass(frozen=True)
class Calibration:
    """Constants of the receptive-field counters, measured on a train split: `dmax` (rf-clip's clip, the
    `quantile` of the clean cells) and, per certified side, rf-mask's intercept `c` and `slope` a (M = a·u + c;
    a side absent from `slope` has a = 1), with the `refill` rule that chose them (`validation`: how `validated`
    chose)."""

    dmax: float
    c: dict[int, float]
    quantile: float = DMAX_QUANTILE
    split: str = ""
    images: int = 0
    receptive_field: dict = field(default_factory=dict)
    slope: dict[int, float] = field(default_factory=dict)
    refill: str = "constant"
    validation: dict = field(default_factory=dict)  # `validated`: per side the held-out errors and the choice
    held_out: list[str] = field(default_factory=list)  # `validated`: the images it chose on

    def save(self, path: Path) -> Path:
        return save_json(path, {**asdict(self), "c": {str(s): v for s, v in self.c.items()},
                                "slope": {str(s): v for s, v in self.slope.items()}})

    @classmethod
    def load(cls, path: Path) -> Calibration:
        try:
            d = json.loads(Path(path).read_text())
            per_side = {key: {int(s): _number(v, f"{key} of side {s}") for s, v in d.get(key, {}).items()}
                        for key in ("c", "slope")}
            calibration = cls(_number(d["dmax"], "dmax"), per_side["c"], _number(d["quantile"], "quantile"),
                              str(d.get("split", "")), int(d.get("images", 0)), d.get("receptive_field", {}),
                              per_side["slope"], d.get("refill", "constant"),
                              {int(s): v for s, v in d.get("validation", {}).items()},
                              [str(name) for name in d.get("held_out", [])])
            calibration.check()
            return calibration
        except FileNotFoundError:
            raise ToolkitError(f"calibration file not found: {path}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ToolkitError(f"{path} is not a calibration of this toolkit: {e}") from None

    def check(self) -> None:
        """Raise ValueError unless every constant is one the certificates hold for."""
        if not 0 < self.dmax <= CELL_CAP or not 0 < self.quantile <= 1:
            raise ValueError(f"dmax must be positive and at most {CELL_CAP:g} (the cap on a cell), and the quantile in "
                             f"(0, 1], got {self.dmax} and {self.quantile}")
        if self.refill not in REFILLS:
            raise ValueError(f"unknown refill {self.refill!r}")
        if any(a < 0 for a in self.slope.values()):
            raise ValueError(f"a negative rf-mask slope {self.slope} (the certificate needs a ≥ 0)")
        if not set(self.slope) <= set(self.c):
            raise ValueError(f"a slope for a side with no intercept: c has {sorted(self.c)}, slope "
                             f"{sorted(self.slope)}")
        if self.refill == "validated":
            if set(self.validation) != set(self.c):
                raise ValueError(f"a validated refill needs a record for every side: c has {sorted(self.c)}, "
                                 f"validation {sorted(self.validation)}")
            for s, record in self.validation.items():
                expected = "fitted" if s in self.slope else "constant"
                if record.get("chosen") != expected or not {"constant", "fitted"} <= set(record):
                    raise ValueError(f"the validated refill's record of side {s} does not match its constants")
        elif self.validation:
            raise ValueError(f"a record of a validated choice in a {self.refill} refill")
        if self.refill == "fitted" and set(self.slope) != set(self.c):
            raise ValueError(f"a fitted refill needs a slope for every side: c has {sorted(self.c)}, slope "
                             f"{sorted(self.slope)}")

    def check_field(self, rf: ReceptiveField, path: Path | str = "the calibration") -> Calibration:
        """This calibration, if it was measured for a model with receptive field `rf`; else an error."""
        if self.receptive_field and self.receptive_field != asdict(rf):
            raise ToolkitError(f"{path} was measured for the receptive field {self.receptive_field}, not this "
                               f"model's {asdict(rf)}")
        return self


def _number(value: object, name: str) -> float:
    """`value` as a finite float; a string, a bool, NaN or an infinity is a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def load_calibration(path: Path, rf: ReceptiveField) -> Calibration:
    """A saved calibration, checked against the receptive field of the model it will certify."""
    return Calibration.load(path).check_field(rf, path)


@torch.no_grad()
def calibrate(model, dataset: CrowdDataset, rf: ReceptiveField, sides: list[int], device: torch.device,
              quantile: float = DMAX_QUANTILE, amp: bool = True, batch_size: int = 4,
              refill: str = "constant", seed: int = 0) -> Calibration:
    """dmax and rf-mask's (a, c) of `model` on the whole images of `dataset` (a train split), for patches of each of
    `sides`; `refill`: `constant` (a = 1, c the mean largest window sum), `fitted` (`fit_refill`) or `validated`:
    per side, each of the two measured on the rest of the split and scored by the mean certified error on its
    held-out part (`held_out(n, VALIDATION_SHARE, seed)`: the validation part a training run with that seed held
    out; the constant one wins a tie), the better one then measured on the whole split. That tenth is a training run's
    validation part only if the run trained on this same split with `--val 0.1` and that seed: the names are
    recorded (`held_out`) to check it against the run's args.json."""
    if len(dataset) == 0:
        raise ToolkitError(f"the calibration split {dataset.root} holds no images")
    if not 0 < quantile <= 1:
        raise ToolkitError(f"the clip quantile must lie in (0, 1], got {quantile}")
    if refill not in REFILLS:
        raise ToolkitError(f"unknown refill {refill!r}; choose from {', '.join(REFILLS)}")
    if refill == "validated" and len(dataset) < 2:
        raise ToolkitError(f"--refill validated holds out part of the calibration split: {dataset.root} has one image")
    cells, rows = [], []  # rows: per image (index, gt, T, then max S_w, min S_w and the densest pair per side)
    for indices, (images, _, counts) in progress(EqualSizeBatches(dataset, batch_size, shard=True), "calibrate"):
        with autocast(device, amp):
            density = bounded(model(images.to(device)).float())
        cells.append(density.flatten().cpu().numpy())
        columns = [torch.tensor(indices, dtype=torch.float64, device=device), counts.double().to(device),
                   density.double().sum((1, 2, 3))]
        integral = integral_image(density)
        for s in sides:
            sums = window_sums(density, rf.window(s), integral).flatten(1)
            columns += [sums.amax(1), sums.amin(1), densest_pair(density, rf.window(s), integral)[0]]
        rows += torch.stack(columns, 1).cpu().tolist()
    cells = distributed.gather(cells)  # under torchrun each rank saw its share of the images
    rows = np.array(sorted(distributed.gather(rows)))  # by image: any order of the batches gives the same constants
    dmax = float(np.quantile(np.concatenate(cells), quantile))
    if not dmax > 0:
        raise ToolkitError(f"the model predicts no density on {dataset.root}: nothing to calibrate the clip on")
    gt, total = rows[:, 1], rows[:, 2]
    held_indices = sorted(held_out(len(dataset), VALIDATION_SHARE, seed)) if refill == "validated" else []
    held = np.isin(rows[:, 0], held_indices)
    c, slope, validation = {}, {}, {}
    for k, s in enumerate(sides):
        largest, smallest, pair = rows[:, 3 + 3 * k], rows[:, 4 + 3 * k], rows[:, 5 + 3 * k]
        low, high = total - pair, total - smallest
        chosen = refill
        if refill == "validated":
            rest = ~held
            errors = {"constant": certified_error(low[held], high[held], gt[held], 1.0, float(np.mean(largest[rest]))),
                      "fitted": certified_error(low[held], high[held], gt[held], *fit_refill(low[rest], high[rest],
                                                                                              gt[rest]))}
            chosen = min(errors, key=errors.get)
            validation[s] = {**errors, "chosen": chosen}
        if chosen == "constant":
            c[s] = float(np.mean(largest))
        else:
            slope[s], c[s] = fit_refill(low, high, gt)
    return Calibration(dmax, c, quantile, str(dataset.root), len(dataset), asdict(rf), slope, refill, validation,
                       [dataset.names[i] for i in held_indices])


def certified_error(low: np.ndarray, high: np.ndarray, gt: np.ndarray, a: float, c: float) -> float:
    """The mean over images of max(|a·low + c − gt|, |a·high + c − gt|): rf-mask's tight-MAE with refill (a, c)."""
    return float(np.mean(np.maximum(np.abs(a * low + c - gt), np.abs(a * high + c - gt))))


def fit_refill(low: np.ndarray, high: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """The (a ≥ 0, c) minimising Σ_i max(|a·low_i + c − gt_i|, |a·high_i + c − gt_i|): with low ≤ high, the
    certified errors of M = a·u + c over images whose u lies in [low, high] under attack. A linear programme in
    (a, c, e_i): minimise Σ e_i with e_i ≥ gt_i − a·low_i − c and e_i ≥ a·high_i + c − gt_i (for a ≥ 0 these two
    imply the other two sides of the absolute values)."""
    from scipy import sparse
    from scipy.optimize import linprog

    n = len(gt)
    ones, eye = np.ones((n, 1)), sparse.identity(n)
    a_ub = sparse.bmat([[-low[:, None], -ones, -eye], [high[:, None], ones, -eye]], format="csr")
    result = linprog(np.r_[0.0, 0.0, np.ones(n)], A_ub=a_ub, b_ub=np.r_[-gt, gt],
                     bounds=[(0, None), (None, None)] + [(0, None)] * n, method="highs")
    if result.status != 0:
        raise ToolkitError(f"the rf-mask refill could not be fitted: {result.message}")
    return float(result.x[0]), float(result.x[1])


class _WindowCertifier(Certifier):
    """What rf-clip and rf-mask share: one float32 forward pass, window sums from one integral image per batch, all
    the results read from the device at once; per side the top-left output cell of the window where a patch hides the
    most people (`hide{s}`) and of the one where it adds the most (`add{s}`)."""

    side_measure = "extent"  # a window of cells is reached by every pixel within one axis-aligned square

    def __init__(self, rf: ReceptiveField, calibration: Calibration):
        self.rf, self.calibration = rf, calibration

    @staticmethod
    def forward(model, images: torch.Tensor) -> torch.Tensor:
        """The model's density in float32, in eval mode."""
        require_eval(model)
        with float32(images.device):
            return model(images.float()).float()

    def post(self, density: torch.Tensor, side: int) -> torch.Tensor:
        """The counter for `side` as a density map, from the model's density."""
        raise NotImplementedError

    def density(self, model, images: torch.Tensor, side: int) -> torch.Tensor:
        return self.post(self.forward(model, images), side)

    def local_counter(self, model, side: int) -> LocalCounter:
        """`density(model, ·, side)` as a `LocalCounter`: patched images evaluated where the patch reaches only."""
        return LocalCounter(model, partial(self.forward, model), partial(self.post, side=side), self.rf)

    def _gain(self, side: int) -> float:
        """How much the counter for `side` multiplies the density's sums by (at least 1)."""
        return 1.0

    def _columns(self, density: torch.Tensor, integral: torch.Tensor, side: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def certify_batch(self, model, images: torch.Tensor, sides: list[int]) -> list[dict]:
        density = self._clean(model, images)
        integral = integral_image(density)
        columns, widths = {}, {}
        for s in sides:
            columns.update(self._columns(density, integral, s))
            widths[s] = density.shape[-1] - min(self.rf.window(s), density.shape[-1]) + 1
        slack = FLOAT_TOLERANCE * (integral[:, -1, -1] + 1)
        for s in sides:  # the rounding of the sums, scaled as the counter scales them
            gain = self._gain(s)
            columns[f"L{s}"], columns[f"U{s}"] = columns[f"L{s}"] - gain * slack, columns[f"U{s}"] + gain * slack
        values = torch.stack([c.double() for c in columns.values()], dim=1).cpu().tolist()  # one transfer
        rows = []
        for per_image in values:
            row = dict(zip(columns, per_image, strict=True))
            for s in sides:  # flat window indices to (row, column) of the top-left cell
                row[f"hide{s}"], row[f"add{s}"] = (list(divmod(int(row[f"{key}{s}"]), widths[s]))
                                                   for key in ("hide", "add"))
            rows.append(row)
        return rows


class RFClipCertifier(_WindowCertifier):
    """rf-clip: the count of the density clipped to [0, dmax], with the interval a patch of each side can move it
    in: L from the densest window (largest S_w), U from the one with most room below dmax (smallest S_w)."""

    method = "rf-clip"

    def post(self, density: torch.Tensor, side: int | None = None) -> torch.Tensor:
        """The certified counter as a density map (its sum is the count): the model's density clipped to [0, dmax].
        Differentiable, so a patch can be optimised against the counter itself."""
        return bounded(density, self.calibration.dmax)

    def density(self, model, images: torch.Tensor, side: int | None = None) -> torch.Tensor:
        return self.post(self.forward(model, images))

    def _clean(self, model, images: torch.Tensor) -> torch.Tensor:
        return self.density(model, images)

    def _columns(self, density: torch.Tensor, integral: torch.Tensor, side: int) -> dict[str, torch.Tensor]:
        dmax = float(torch.tensor(self.calibration.dmax, dtype=density.dtype))  # the clip as the map holds it
        w = self.rf.window(side)
        sums, total = window_sums(density, w, integral).flatten(1), integral[:, -1, -1]
        hide, hide_at = sums.max(dim=1)
        least, add_at = sums.min(dim=1)
        area = min(w, density.shape[-2]) * min(w, density.shape[-1])
        return {"count": total, f"L{side}": total - hide, f"U{side}": total + dmax * area - least,
                f"hide{side}": hide_at, f"add{side}": add_at}

    def settings(self) -> dict:
        return {"method": self.method, "receptive_field": asdict(self.rf), "dmax": self.calibration.dmax,
                "dmax_quantile": self.calibration.quantile}


class RFMaskCertifier(_WindowCertifier):
    """rf-mask: per side s its own counter, a·(the total minus the densest window) + c_s, with its interval; a patch
    hides the most at one window of the densest pair (L), adds the most at the sparsest window (U)."""

    method = "rf-mask"
    count_per_side = True

    def _refill(self, side: int) -> tuple[float, float]:
        """(a, c) of the counter for `side`: M = a·(T − max S_w) + c."""
        if side not in self.calibration.c:
            raise ToolkitError(f"the calibration holds no rf-mask constant for {side} px patches "
                               f"(it has {sorted(self.calibration.c)}); calibrate again with this side")
        return self.calibration.slope.get(side, 1.0), self.calibration.c[side]

    def _clean(self, model, images: torch.Tensor) -> torch.Tensor:
        return bounded(self.forward(model, images))

    def _gain(self, side: int) -> float:
        return max(1.0, self._refill(side)[0])

    def _outside_densest(self, density: torch.Tensor, side: int, sums: torch.Tensor | None = None) -> torch.Tensor:
        """`density` (≥ 0) with its densest window for `side` (the first, where several tie; from its window `sums`,
        if already computed) set to 0. Masked, not subtracted: T − max S cancels when the window holds values far
        above the rest (an attacked map), and a masked inf stays 0, not NaN."""
        n, _, h, w = density.shape
        kh, kw = min(self.rf.window(side), h), min(self.rf.window(side), w)
        sums = window_sums(density.detach(), self.rf.window(side)) if sums is None else sums
        at = sums.flatten(1).argmax(dim=1)
        rows, cols = torch.arange(h, device=density.device), torch.arange(w, device=density.device)
        top, left = (at // (w - kw + 1)).view(n, 1, 1), (at % (w - kw + 1)).view(n, 1, 1)
        inside = ((rows.view(1, h, 1) >= top) & (rows.view(1, h, 1) < top + kh)
                  & (cols.view(1, 1, w) >= left) & (cols.view(1, 1, w) < left + kw))
        return density.masked_fill(inside.unsqueeze(1), 0)

    def post(self, density: torch.Tensor, side: int) -> torch.Tensor:
        """The counter for `side` as a density map (its sum is the count): the model's density, `bounded`, with
        its densest window zeroed, times a, and c spread evenly. Differentiable almost everywhere (where the window is
        fixed)."""
        a, c = self._refill(side)
        h, w = density.shape[-2:]
        return a * self._outside_densest(bounded(density), side) + c / (h * w)

    def _columns(self, density: torch.Tensor, integral: torch.Tensor, side: int) -> dict[str, torch.Tensor]:
        a, c = self._refill(side)
        sums, total = window_sums(density, self.rf.window(side), integral).flatten(1), integral[:, -1, -1]
        outside = self._outside_densest(density, side, sums).double().sum(dim=(1, 2, 3))
        smallest, add_at = sums.min(dim=1)
        pair, hide_at = densest_pair(density, self.rf.window(side), integral)
        return {"total": total, f"count{side}": a * outside + c, f"L{side}": a * (total - pair) + c,
                f"U{side}": a * (total - smallest) + c, f"hide{side}": hide_at, f"add{side}": add_at}

    def settings(self) -> dict:
        return {"method": self.method, "receptive_field": asdict(self.rf), "refill": self.calibration.refill,
                "c": {str(s): v for s, v in self.calibration.c.items()},
                "slope": {str(s): self.calibration.slope.get(s, 1.0) for s in self.calibration.c}}


def window_box(rf: ReceptiveField, side: int, cell: list[int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) in input pixels of the union of the receptive fields of the w×w output window
    whose top-left cell is `cell`, clipped to an image of `shape` (for figures)."""
    w = rf.window(side)
    top, left = cell[0] * rf.stride + rf.offset, cell[1] * rf.stride + rf.offset
    bottom, right = top + (w - 1) * rf.stride + rf.side, left + (w - 1) * rf.stride + rf.side
    top, left = max(top, 0), max(left, 0)
    return top, left, min(bottom, shape[0]) - top, min(right, shape[1]) - left


def extreme_windows(rf: ReceptiveField, side: int, covered: int, row: dict, shape: tuple[int, int]
                    ) -> list[tuple[str, tuple[int, int, int, int], str]]:
    """The (label, box, colour) of the windows where a patch of nominal `side` (certified as `covered`) hides (red)
    and adds (blue) the most people, from a row keyed by the nominal side (for `plots.window_figure`)."""
    return [(f"hides the most: L = {row[f'L{side}']:.1f}", window_box(rf, covered, row[f"hide{side}"], shape), "red"),
            (f"adds the most: U = {row[f'U{side}']:.1f}", window_box(rf, covered, row[f"add{side}"], shape), "blue")]

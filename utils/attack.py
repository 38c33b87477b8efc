"""APAM: a universal adversarial patch optimised with an L1-normalised, momentum gradient step.

The loss is the MSE between the density of the patched image and a target density `l*` (or ∓ the count for the
untargeted variants), plus an optional total-variation weight on the patch. Each step descends that loss.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from datasets.crowd import CrowdDataset, EqualSizeBatches, same_size_batches
from utils import distributed
from utils.errors import ToolkitError
from utils.local_eval import LocalCounter, LocalSmoothedCounter
from utils.metrics import summarize
from utils.patch import PatchSpec, random_patch, sweep_centers
from utils.runtime import autocast, progress, rank_seed

TARGETS = ("pred-scale", "gt-scale", "zero", "maximize", "minimize")
DEFAULT_SIDE = 44  # px: a circle on 2 % of a 240×320 synthetic image
PROBE_LR = 0.03  # η of the fixed-budget probe attacks (`attack_metrics`): few steps, so larger ones
MOMENTUM_FORMS = ("mifgsm", "paper")


@dataclass
class APAMConfig:
    target: str = "pred-scale"  # l* = tau × clean prediction (csr_attack.py); gt-scale: tau × ground truth
    tau: float = 10.0
    lr: float = 0.01  # η, in [0, 1] pixel units per step
    momentum: float = 0.9  # ζ
    momentum_form: str = "mifgsm"  # v = ζ v + ĝ, p -= η sign(v); paper: V = ζ p + (1 - ζ) ĝ, p -= η V
    tv_weight: float = 0.0  # γ

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ToolkitError(f"unknown attack target {self.target!r}; choose from {', '.join(TARGETS)}")
        if self.momentum_form not in MOMENTUM_FORMS:
            raise ToolkitError(f"unknown momentum form {self.momentum_form!r}; choose from "
                               f"{', '.join(MOMENTUM_FORMS)}")
        if not 0 <= self.momentum <= 1:
            raise ToolkitError(f"momentum must lie in [0, 1], got {self.momentum}")


def total_variation(patch: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring patch pixels (a smoothness penalty)."""
    return (patch[:, 1:, :] - patch[:, :-1, :]).abs().mean() + (patch[:, :, 1:] - patch[:, :, :-1]).abs().mean()


def target_density(kind: str, tau: float, clean: torch.Tensor, gt: torch.Tensor | None) -> torch.Tensor | None:
    """The density l* the attack pulls towards (None for the untargeted count objectives)."""
    if kind == "pred-scale":
        return tau * clean
    if kind == "gt-scale":
        if gt is None:
            raise ToolkitError("target gt-scale needs ground-truth densities")
        return tau * gt
    if kind == "zero":
        return torch.zeros_like(clean)
    return None


def attack_loss(pred: torch.Tensor, kind: str, target: torch.Tensor | None) -> torch.Tensor:
    """Per-batch loss that the attack descends: MSE to the target density, or ∓ the mean count."""
    if kind == "maximize":
        return -pred.sum(dim=(1, 2, 3)).mean()
    if kind == "minimize":
        return pred.sum(dim=(1, 2, 3)).mean()
    return F.mse_loss(pred.float(), target.float(), reduction="sum") / len(pred)


def momentum_step(patch: torch.Tensor, velocity: torch.Tensor, grad: torch.Tensor, lr: float, zeta: float,
                  form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One update of (patch, velocity) from the raw gradient; the patch is clipped to [0, 1]."""
    unit = grad / grad.abs().sum().clamp_min(1e-20)
    if form == "paper":  # the literal rule of the paper's figure and code: "momentum" on the patch itself
        velocity = zeta * patch + (1 - zeta) * unit
        return (patch - lr * velocity).clamp(0, 1), velocity
    velocity = zeta * velocity + unit  # MI-FGSM (Dong et al. 2018)
    return (patch - lr * velocity.sign()).clamp(0, 1), velocity


class APAM:
    """Optimises one universal patch, applied as `spec` says, against `model` (which may include ablation in front,
    for EOT)."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], patch: torch.Tensor, spec: PatchSpec,
                 config: APAMConfig, generator: torch.Generator | None = None, amp: bool = True):
        self.model, self.spec, self.config, self.generator, self.amp = model, spec, config, generator, amp
        self.patch = patch.detach().clone().clamp_(0, 1)
        self.velocity = torch.zeros_like(self.patch)

    def batch_target(self, images: torch.Tensor, gt: torch.Tensor | None) -> torch.Tensor | None:
        """l* of a batch; computed once per batch, since it depends on the clean images only."""
        if self.config.target not in ("pred-scale", "gt-scale", "zero"):
            return None
        with torch.no_grad(), autocast(images.device, self.amp):
            clean = self.model(images).float() if self.config.target != "gt-scale" else gt
        return target_density(self.config.target, self.config.tau, clean, gt)

    def loss(self, images: torch.Tensor, target: torch.Tensor | None, patch: torch.Tensor) -> torch.Tensor:
        patched, _ = self.spec.apply(images, patch, self.generator)
        with autocast(images.device, self.amp):
            pred = self.model(patched)
        loss = attack_loss(pred, self.config.target, target)
        if self.config.tv_weight:
            loss = loss + self.config.tv_weight * total_variation(patch)
        return loss

    def step(self, images: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """Transforms, forward, backward and update on one batch; returns the loss before the update (a 0-dim
        tensor on the device: reading it would wait for the device, so `fit` reads the sum once per epoch)."""
        patch = self.patch.requires_grad_(True)
        loss = self.loss(images, target, patch)
        (grad,) = torch.autograd.grad(loss, patch)
        distributed.all_reduce_mean(grad)  # under torchrun: every rank's batch, so every rank takes the same step
        self.patch, self.velocity = momentum_step(patch.detach(), self.velocity, grad, self.config.lr,
                                                  self.config.momentum, self.config.momentum_form)
        return loss.detach()

    def fit(self, batches: Callable[[int], Iterable], epochs: int, steps: int = 1, desc: str = "APAM",
            total: int | None = None) -> list[float]:
        """`epochs` passes over `batches(epoch)` (`total` batches of (images, gt density)), `steps` updates per
        batch; mean loss per epoch."""
        losses = []
        for epoch in range(epochs):
            summed, count = 0.0, 0
            for images, gt in progress(batches(epoch), f"{desc} epoch {epoch + 1}/{epochs}", total=total):
                target = self.batch_target(images, gt)
                for _ in range(steps):
                    summed = summed + self.step(images, target).float()
                    count += 1
            losses.append(float(distributed.all_reduce_mean(torch.as_tensor(summed, dtype=torch.float64)))
                          / max(count, 1))
        return losses


def optimise_patch(model: Callable[[torch.Tensor], torch.Tensor], dataset: CrowdDataset, patch: torch.Tensor,
                   spec: PatchSpec, config: APAMConfig, device: torch.device, epochs: int, steps: int = 1,
                   batch_size: int = 8, seed: int = 0, amp: bool = True, desc: str = "APAM",
                   ) -> tuple[torch.Tensor, list[float]]:
    """APAM over shuffled same-size batches of `dataset` from the starting `patch`: (the patch, loss per epoch).

    Everything random (batch order, crops, patch transforms and placements) follows from `seed`. Under torchrun each
    rank takes its share of every epoch's batches and the patch gradient is averaged across ranks before each
    update, so every rank holds the same patch (checked at the end)."""
    order = torch.Generator().manual_seed(seed)  # the batch order: the same on every rank
    # one process draws its transforms from the order's stream too; each rank draws its own
    gen = order if distributed.world_size() == 1 else torch.Generator().manual_seed(rank_seed(seed))
    attack = APAM(model, patch.to(device), spec, config, gen, amp)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dataset.set_epoch(epoch, seed)
        for _, (images, targets, _) in EqualSizeBatches(dataset, batch_size, True, order, shard=True, pad=True):
            yield images.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    total = len(distributed.shard(same_size_batches(dataset.sizes(), batch_size), pad=True))
    losses = attack.fit(batches, epochs, steps, desc, total=total)
    distributed.check_replicas("patches", [attack.patch])
    return attack.patch, losses


@torch.no_grad()
def patched_counts(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, gt: torch.Tensor,
                   patch: torch.Tensor, spec: PatchSpec, placement: str | None = None,
                   generator: torch.Generator | None = None, sweep: int = 3, amp: bool = True,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counts of a batch with the patch applied as `spec` says: (counts (N,), patched images, densities).

    `placement` (default the spec's) `sweep` tries a `sweep`×`sweep` grid of positions per image and keeps the one
    whose count is farthest from the ground truth `gt` (N,), the worst case for the defender; a `LocalCounter` or
    `LocalSmoothedCounter` evaluates those placements locally (the same counts, a fraction of the operations).
    """
    n, _, h, w = images.shape
    if (placement or spec.placement) != "sweep":
        patched, _ = spec.apply(images, patch, generator, placement)
        with autocast(images.device, amp):
            density = model(patched).float()
        return density.sum(dim=(1, 2, 3)), patched, density
    grid = sweep_centers(h, w, spec.side, sweep)
    k = len(grid)
    batch = images.repeat_interleave(k, dim=0)
    patched, _ = spec.paste(batch, patch, grid.repeat(n, 1), generator)
    with autocast(images.device, amp):
        if isinstance(model, LocalCounter | LocalSmoothedCounter):  # one whole pass per image, a crop per placement
            density = model.patched_density(images, patched.view(n, k, *patched.shape[1:])).float()
        else:
            density = model(patched).float()
    counts = density.sum(dim=(1, 2, 3)).view(n, k)
    worst = (counts - gt.view(n, 1).to(counts)).abs().argmax(dim=1)
    pick = torch.arange(n, device=counts.device) * k + worst
    return counts.flatten()[pick], patched[pick], density[pick]


def evaluate_patch(model: Callable[[torch.Tensor], torch.Tensor], dataset: CrowdDataset, patch: torch.Tensor,
                   spec: PatchSpec, device: torch.device, placement: str | None = None, batch_size: int = 8,
                   seed: int = 0, amp: bool = True, keep_maps: int = 0, control: bool = True) -> tuple[list, list]:
    """Per-image rows (gt, clean, attacked, control counts) of a fixed patch on `dataset`, placed by `placement`
    (default the spec's), with a uniform-noise patch of the same spec as control (left out, and half the passes,
    without `control`); plus (name, patched image, clean density, attacked density) for the first `keep_maps`
    images."""
    patches = {"attacked": patch}
    if control:
        patches["control"] = random_patch(spec.side, torch.Generator().manual_seed(seed + 1)).to(device)
    rows, maps = [], []
    for index, (images, _, gt) in progress(EqualSizeBatches(dataset, batch_size, shard=True), "test"):
        images = images.to(device)
        with torch.no_grad(), autocast(device, amp):
            clean = model(images).float()
        counts, shown = {}, None
        for label, p in patches.items():
            gen = torch.Generator().manual_seed(seed + index[0])  # the same draws for patch and control
            counts[label], patched, density = patched_counts(model, images, gt, p, spec, placement, gen, amp=amp)
            shown = shown or (patched, density)
        for j, i in enumerate(index):
            if i < keep_maps:
                maps.append((i, dataset.names[i], shown[0][j].cpu(), clean[j].cpu(), shown[1][j].cpu()))
            rows.append({"index": i, "image": dataset.names[i], "gt": float(gt[j]), "clean": float(clean[j].sum()),
                         **{label: float(c[j]) for label, c in counts.items()}})
    rows = distributed.gather(rows, key=lambda r: r["index"])  # under torchrun, each rank's share
    return rows, [m[1:] for m in distributed.gather(maps, key=lambda m: m[0])]


def patch_metrics(rows: list[dict]) -> dict:
    """MAE / RMSE of the clean, attacked and control counts; the clean counts' mean signed error (`bias`: negative
    for a model that undercounts); the mean count shifts against the clean counts (`mean_shift`); and the
    attacked counts' mean shift against the control's, the noise patch of the same size and placement
    (`shift_vs_control`: what the patch's content does, beyond covering the pixels). The shifts show a push
    that an MAE ratio can hide: pushing up the counts of a model that undercounts first lowers its MAE. Rows without
    control counts give no control figures."""
    n, gt = len(rows), [r["gt"] for r in rows]
    labels = [label for label in ("clean", "attacked", "control") if label in rows[0]]
    out = {label: summarize([r[label] for r in rows], gt) for label in labels}
    out["clean"]["bias"] = sum(r["clean"] - r["gt"] for r in rows) / n
    for label in labels[1:]:
        out[label]["mean_shift"] = sum(r[label] - r["clean"] for r in rows) / n
    if "control" in out:
        out["attacked"]["shift_vs_control"] = sum(r["attacked"] - r["control"] for r in rows) / n
    out["mean_gt"] = sum(gt) / n
    return out


def attack_metrics(model: torch.nn.Module, attack_set: CrowdDataset, test_set: CrowdDataset, spec: PatchSpec,
                   device: torch.device, amp: bool = True, config: APAMConfig | None = None,
                   epochs: int = 6, restarts: int = 2, batch_size: int = 8, seed: int = 0, attack_through=None,
                   counter=None, placement: str | None = None, control: bool = True) -> tuple[dict, list[dict]]:
    """A fixed-budget probe: `restarts` fresh APAM patches (noise from seeds `seed`, `seed + 1`, ...), each optimised
    on `attack_set` (e.g. crops: cheaper steps) for `epochs` and evaluated on `test_set`; the strongest (highest
    attacked MAE) counts: (`patch_metrics`, per-image rows). One budget for every model makes their attacked MAEs
    comparable; restarts tame the spread of a single universal-patch optimisation (on the synthetic victim, 26 to 37
    MAE across seeds with one).

    The patch is optimised through `attack_through` (default `model`; e.g. the model behind random ablations) and
    counted by `counter` (default `model`; e.g. the median-smoothed counter), placed on the test images by
    `placement` (default the spec's; "sweep": the worst of a grid per image), beside a noise control where `control`.
    """
    config = config or APAMConfig(lr=PROBE_LR)
    trainable = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        best = None
        for r in range(restarts):  # restart r draws everything from seed + r: the same for every model probed
            start = random_patch(spec.side, torch.Generator().manual_seed(seed + r))
            patch, _ = optimise_patch(attack_through or model, attack_set, start, spec, config, device, epochs, 1,
                                      batch_size, seed + r, amp, desc=f"probe {r + 1}/{restarts}")
            rows, _ = evaluate_patch(counter or model, test_set, patch, spec, device, placement, batch_size, seed, amp,
                                     control=control)
            metrics = patch_metrics(rows)
            if best is None or metrics["attacked"]["mae"] > best[0]["attacked"]["mae"]:
                best = metrics, rows
    finally:
        for p, flag in zip(model.parameters(), trainable, strict=True):
            p.requires_grad_(flag)
    return best

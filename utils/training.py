"""The training loop shared by the training scripts and the cached victims: Adam, cosine schedule, resume,
best/last. What a step minimises and how an epoch is validated is a `Recipe` (plain, ablation, adversarial)."""
from __future__ import annotations

import copy
import logging
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from datasets.crowd import VALIDATION_SHARE, CrowdDataset
from models.weights import load_state
from utils import distributed
from utils.engine import evaluate, load_run_checkpoint, save_run_checkpoint, train_one_epoch
from utils.errors import ToolkitError
from utils.io import load_checkpoint, save_csv, save_json
from utils.metrics import mae
from utils.plots import curve_figure
from utils.runtime import derived_generator, prepare_model
from utils.text import plural

log = logging.getLogger(__name__)

# train.py's defaults: MCNN on the synthetic crowds reaches ~0.2x the mean-count baseline MAE in ~3 CPU minutes
DEFAULTS = {"epochs": 40, "batch_size": 4, "crop": 128, "lr": 1e-3}
VALIDATION = VALIDATION_SHARE  # the share of a train split held out to choose the checkpoint (--val)


class Recipe:
    """Plain training: `model.loss` on the clean batch, validation by clean MAE / RMSE of whole test images.

    Subclasses change the step loss (e.g. on ablated or patched inputs) and the validation; whatever state they
    carry between steps goes through `state_dict` into the checkpoints, so a resumed run restores it, and the
    settings a checkpoint's user needs (the ablation or patch spec) through `record`.
    """

    count_weight = 0.0  # the weight of the crops' absolute count error beside the MSE (subclasses: none)

    def __init__(self, count_weight: float = 0.0):
        self.count_weight = count_weight

    def loss(self, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        return model.loss(images, targets, self.count_weight)

    def validate(self, model: torch.nn.Module, test_set: CrowdDataset, device: torch.device, amp: bool,
                 epoch: int) -> tuple[dict, list[dict]]:
        """(metrics to log, with the `mae` that picks best.pt, and per-image rows); `bias` is the mean signed error
        (negative: the model undercounts)."""
        metrics, rows, _ = evaluate(model, test_set, device, amp)
        bias = sum(r["pred"] - r["gt"] for r in rows) / max(len(rows), 1)
        return {"mae": metrics["mae"], "rmse": metrics["rmse"], "bias": bias}, rows

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def record(self) -> dict:
        """Settings written at the top level of every checkpoint (e.g. `ablation`: the spec trained with)."""
        return {}

    def replicated(self) -> list[torch.Tensor]:
        """The state every rank must hold identically under torchrun (checked with the weights at the end)."""
        return []


class Objective(torch.nn.Module):
    """A recipe's step loss as a module: DistributedDataParallel needs the forward pass that the backward follows."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe):
        super().__init__()
        self.model, self.recipe = model, recipe

    def forward(self, images: torch.Tensor, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        return self.recipe.loss(self.model, images, targets, epoch)


class WeightAverage:
    """An exponential moving average of a model's weights and batch-norm statistics, updated after every optimiser
    step: avg ← decay · avg + (1 − decay) · weights (non-float buffers, e.g. batch counts, copied). A small crowd
    counter's count swings by a large share from one epoch to the next (SmallField on Part A: a bias of −160 to
    +175); the average is what is validated and kept."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ToolkitError(f"the weight average's decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for avg, new in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if avg.is_floating_point():
                avg.lerp_(new, 1.0 - self.decay)
            else:
                avg.copy_(new)


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The rate annealed from its initial value to 0 over `epochs` by a half cosine, in closed form, so a run
    resumed with more epochs continues on the longer schedule's curve."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: 0.5 * (1 + math.cos(math.pi * min(epoch, epochs) / epochs)))


def restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    """Load a schedule's state and set the rate of the epoch it stands at from the schedule as built now (a resumed
    run with more epochs takes the longer curve's rate at once, not the saved one)."""
    scheduler.load_state_dict(state)
    for group, base, rate in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                 strict=True):
        group["lr"] = base * rate(scheduler.last_epoch)


def fit(model: torch.nn.Module, train_set: CrowdDataset, val_set: CrowdDataset | None,
        test_set: CrowdDataset | None, out: Path, *, epochs: int, batch_size: int, lr: float, device: torch.device,
        weight_decay: float = 0.0, amp: bool = True, workers: int = 0, resume: bool = False,
        record: dict | None = None, recipe: Recipe | None = None, seed: int = 0, figure_format: str = "png",
        ema: float = 0.0) -> dict:
    """Train `model` on random crops of `train_set` by `recipe` (plain by default), validate on `val_set` (a part held
    out of the train split) every epoch, keep last.pt and best.pt (lowest validation `mae`; without `val_set`, no
    best.pt), then evaluate the kept checkpoint once on `test_set`, which never chooses anything.

    Returns the summary also written to metrics.json: at the top level the test figures of the kept checkpoint
    (`checkpoint`: best.pt, or last.pt where no epoch was eligible; `best_epoch`), the rows of per_image.csv; under
    `validation` its validation figures; under `last` the last epoch's. Epoch e's batch order and crops are a
    function of (`seed`, e): a resumed run trains exactly as an uninterrupted one. Under torchrun each rank trains
    on its share of every epoch's order (`batch_size` crops per rank and step) and DistributedDataParallel averages
    the gradients, so every rank holds the same weights. The curves go to curves.<figure_format> and
    val_mae.<figure_format> (png, pdf or svg).

    With `ema` (a decay per step, e.g. 0.99), a `WeightAverage` of the weights is validated, scored and saved as the
    checkpoints' model; the weights being trained travel in them as `training_weights`, for `resume`."""
    recipe = recipe or Recipe()
    train_counts = train_set.counts()
    model.adapt_to_counts(train_counts)
    model = prepare_model(model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = cosine_schedule(optimizer, epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")

    def loader(epoch: int) -> DataLoader:
        train_set.set_epoch(epoch, seed)
        order = derived_generator(seed, epoch)
        options = {"num_workers": workers, "pin_memory": device.type == "cuda"}
        if distributed.active():  # the epoch's order (the same on every rank) cut into this rank's share
            share = distributed.shard(torch.randperm(len(train_set), generator=order).tolist(), pad=True)
            return DataLoader(train_set, batch_size=batch_size, sampler=share, drop_last=len(share) > batch_size,
                              **options)
        return DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=order,
                          drop_last=len(train_set) > batch_size, **options)

    def baseline(dataset: CrowdDataset) -> float:  # the MAE of always predicting the training mean count
        return mae(np.full(len(dataset), train_counts.mean()), dataset.counts())

    start, history, best, trained = 0, [], float("inf"), None
    if resume:
        state = load_run_checkpoint(out / "last.pt", model, optimizer)
        trained = state.get("training_weights")  # with `ema` the checkpoint's model is the average
        restore_schedule(scheduler, state["scheduler"])
        recipe.load_state_dict(state.get("recipe", {}))
        start, history, best = state["epoch"] + 1, state["history"], state["best"]
        log.info(f"resumed from {out / 'last.pt'} at epoch {start + 1}")
    objective = None
    if distributed.active():  # gradients averaged across ranks in the backward pass; rank 0's weights to start
        objective = DistributedDataParallel(Objective(model, recipe),
                                            device_ids=[device] if device.type == "cuda" else None)
    average = None
    if ema:  # after the wrap, which gave every rank rank 0's weights: on resume, the checkpoint's average
        average = WeightAverage(model, ema)
        if trained is not None:  # training goes on from the weights trained, not from their average
            model.load_state_dict(trained)
    kept_model = model if average is None else average.model  # what is validated, saved and scored

    val_baseline = None if val_set is None else baseline(val_set)
    for epoch in range(start, epochs):
        step_loss = partial(recipe.loss, epoch=epoch) if objective is None else \
            (lambda _, images, targets, e=epoch: objective(images, targets, e))
        loss = train_one_epoch(model, loader(epoch), optimizer, device, scaler, amp, step_loss,
                               desc=f"epoch {epoch + 1}",
                               after_step=None if average is None else partial(average.update, model))
        loss = float(distributed.all_reduce_mean(torch.tensor(loss, dtype=torch.float64, device=device)))
        distributed.sync_buffers(model)  # batch-norm statistics: rank 0's, as DDP's next forward would make them
        if average is not None:  # averaged from each rank's own statistics: rank 0's, so all validate one model
            distributed.sync_buffers(average.model)
        scheduler.step()
        metrics = {}
        if val_set is not None:
            metrics, rows = recipe.validate(kept_model, val_set, device, amp, epoch)
            _warn_if_dead(rows)
        history.append({"epoch": epoch + 1, "loss": loss, **metrics})
        shown = "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else v for k, v in metrics.items() if v != "")
        log.info(f"epoch {epoch + 1}/{epochs}  loss {loss:.4f}" + (shown and f"  validation {shown}  (mean-count "
                                                                      f"baseline MAE {val_baseline:.2f})"))
        extra = {"scheduler": scheduler.state_dict(), "recipe": recipe.state_dict(), **recipe.record()}
        if average is not None:
            extra["training_weights"] = model.state_dict()
        if metrics.get("mae", math.nan) < best:
            best = metrics["mae"]
            save_run_checkpoint(out / "best.pt", kept_model, optimizer, epoch, record or {}, history, best, extra)
        save_run_checkpoint(out / "last.pt", kept_model, optimizer, epoch, record or {}, history, best, extra)
        save_csv(out / "log.csv", history)

    if not history:
        raise ToolkitError(f"nothing to do: the run in {out} already finished {epochs} epochs")
    distributed.check_replicas("model weights", [*model.state_dict().values(), *recipe.replicated(),
                                                 *([] if average is None else average.model.state_dict().values())])
    last = history[-1]
    best_row = min((h for h in history if h.get("mae", math.nan) == h.get("mae", math.nan)),
                   key=lambda h: h["mae"], default=None)  # NaN-safe: epochs with no validation MAE are skipped
    kept = best_row or last
    if best_row is not None and best_row is not last:  # the test split sees the checkpoint chosen, once
        load_state(kept_model, load_checkpoint(out / "best.pt"), str(out / "best.pt"))
    summary = {"model": model.name, "epochs": len(history), "checkpoint": "last.pt" if best_row is None else "best.pt",
               "best_epoch": None if best_row is None else best_row["epoch"], "train_images": len(train_set)}
    if test_set is not None:
        metrics, rows = recipe.validate(kept_model, test_set, device, amp, kept["epoch"] - 1)
        save_csv(out / "per_image.csv", rows)
        test_baseline = baseline(test_set)
        summary.update(metrics, baseline_mae=test_baseline, test_images=len(test_set),
                       mae_over_baseline=metrics["mae"] / max(test_baseline, 1e-12))
    summary["validation"] = None if val_set is None else {
        **{k: v for k, v in kept.items() if k not in ("epoch", "loss")}, "baseline_mae": val_baseline,
        "images": val_set.names}
    summary["last"] = last
    save_json(out / "metrics.json", summary)
    curve_figure(out / f"curves.{figure_format}", {"train loss": [h["loss"] for h in history]},
                 ylabel="training loss (epoch mean)", title=f"training loss per epoch ({model.name})")
    if val_set is not None:
        curve_figure(out / f"val_mae.{figure_format}", {"validation MAE": [h["mae"] for h in history],
                                                        "mean-count baseline": [val_baseline] * len(history)},
                     ylabel="MAE (people)",
                     title=f"validation MAE per epoch ({model.name}, {plural(len(val_set), 'image')})")
    if best_row is not None:
        chosen = f"best.pt (epoch {best_row['epoch']}, validation MAE {best_row['mae']:.2f})"
    elif val_set is None:
        chosen = "no validation part: last.pt is kept"
    else:  # e.g. adversarial training with kappa 1 throughout
        chosen = "no epoch was eligible for best.pt (validation MAE undefined): last.pt is kept"
    if test_set is not None:
        chosen += f"; test MAE {summary['mae']:.2f} vs mean-count baseline {summary['baseline_mae']:.2f}"
    log.info(chosen)
    return summary


def _warn_if_dead(rows: list[dict]) -> None:
    if rows and all(r.get("pred") == 0 for r in rows):
        log.warning("warning: the model predicts exactly 0 everywhere (a dead final ReLU, as MCNN/CMTL's original "
                    "init can give); try another seed or a lower learning rate")

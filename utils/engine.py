"""Training epochs, evaluation and run checkpoints, shared by the training and evaluation scripts."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from datasets.crowd import CrowdDataset, EqualSizeBatches
from models.weights import checkpoint_state, load_state
from utils import distributed
from utils.errors import ToolkitError
from utils.io import load_checkpoint, plain, save_checkpoint
from utils.metrics import game, summarize
from utils.runtime import autocast, progress

GAME_LEVELS = (0, 1, 2, 3)
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _to(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(device, non_blocking=True,
                 memory_format=torch.channels_last if t.dim() == 4 else torch.preserve_format)
            for t in tensors]


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device, scaler: torch.amp.GradScaler | None = None, amp: bool = True,
                    loss_fn: LossFn | None = None, desc: str = "train",
                    after_step: Callable[[], None] | None = None) -> float:
    """One pass over `loader`, minimising `loss_fn(model, images, targets)` (default `model.loss`); `after_step` is
    called after every optimiser step (e.g. to update a moving average of the weights)."""
    model.train()
    total, seen = 0.0, 0
    for images, targets, _ in progress(loader, desc):
        images, targets = _to(device, images, targets)
        with autocast(device, amp):
            loss = loss_fn(model, images, targets) if loss_fn is not None else model.loss(images, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if after_step is not None:
            after_step()
        total = total + loss.detach().float() * len(images)  # summed on the device, read once per epoch
        seen += len(images)
    return float(total) / max(seen, 1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: CrowdDataset, device: torch.device, amp: bool = True,
             transform: Callable[[torch.Tensor], torch.Tensor] | None = None, keep_maps: int = 0,
             desc: str = "eval", weights: str | Path | None = None) -> tuple[dict, list[dict], list[tuple]]:
    """Whole-image evaluation at batch size 1 (sizes vary); under torchrun each rank takes its share of the images
    and every rank gets all the results. With `weights` (the file the model was loaded from), a count that is not
    finite is an error naming it.

    Returns (metrics with mae, rmse and game0..3, one row per image, and the (image, target, prediction)
    of the first `keep_maps` images for figures).
    """
    model.eval()
    rows, maps = [], []
    for (i,), (image, target, count) in progress(EqualSizeBatches(dataset, 1, shard=True), desc):
        image, target = _to(device, image, target)
        if transform is not None:
            image = transform(image)
        with autocast(device, amp):
            pred = model(image).float()
        row = {"index": i, "image": dataset.names[i], "gt": float(count), "pred": float(pred.sum())}
        row.update({f"game{lv}": game(pred[0, 0], target[0, 0], lv) for lv in GAME_LEVELS})
        rows.append(row)
        if i < keep_maps:
            maps.append((i, image[0].cpu(), target[0].cpu(), pred[0].cpu()))
    rows = distributed.gather(rows, key=lambda r: r["index"])
    maps = [m[1:] for m in distributed.gather(maps, key=lambda m: m[0])]
    gt, pred = [r["gt"] for r in rows], [r["pred"] for r in rows]
    if weights is not None:
        check_finite_counts(pred, [r["image"] for r in rows], weights)
    metrics = {**summarize(pred, gt), "n_images": len(rows)}
    metrics.update({f"game{lv}": float(np.mean([r[f"game{lv}"] for r in rows])) for lv in GAME_LEVELS})
    return metrics, rows, maps


def check_finite_counts(counts: list[float], names: list[str], weights: str | Path) -> None:
    """Every count is finite (one vectorised check); else an error naming the weights and the first image."""
    bad = ~np.isfinite(np.asarray(counts, dtype=np.float64))
    if bad.any():
        raise ToolkitError(f"the model loaded from {weights} counts NaN or Inf on {int(bad.sum())} of {len(counts)} "
                           f"images (first: {names[int(bad.argmax())]}): its activations overflow (on CUDA, try "
                           "--no-amp)")


def save_run_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                        args: dict, history: list[dict], best: float, extra: dict | None = None) -> Path:
    """`last.pt`/`best.pt`: the model file format of `models.weights` plus what `--resume` needs."""
    state = checkpoint_state(model)
    state.update(optimizer=optimizer.state_dict(), epoch=epoch, args=plain(args), history=history,
                 best=best, **(extra or {}))
    return save_checkpoint(path, state)


def load_run_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer from a run checkpoint; returns the whole checkpoint dict."""
    state = load_checkpoint(path)
    load_state(model, state, str(path))
    optimizer.load_state_dict(state["optimizer"])
    return state

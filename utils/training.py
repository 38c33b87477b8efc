"""The training loop shared by `train.py` and the cached victims: Adam, cosine schedule, resume, best/last."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from datasets.crowd import CrowdDataset
from utils.engine import evaluate, load_run_checkpoint, save_run_checkpoint, train_one_epoch
from utils.errors import ToolkitError
from utils.io import save_csv, save_json
from utils.metrics import mae
from utils.plots import curve_figure
from utils.runtime import prepare_model

Transform = Callable[[torch.Tensor], torch.Tensor]
# train.py's defaults: MCNN on the synthetic crowds reaches ~0.2x the mean-count baseline MAE in ~3 CPU minutes
DEFAULTS = {"epochs": 40, "batch_size": 4, "crop": 128, "lr": 1e-3}


def fit(model: torch.nn.Module, train_set: CrowdDataset, test_set: CrowdDataset, out: Path, *, epochs: int,
        batch_size: int, lr: float, device: torch.device, weight_decay: float = 0.0, amp: bool = True,
        workers: int = 0, resume: bool = False, record: dict | None = None,
        epoch_transform: Callable[[int], Transform | None] | None = None) -> dict:
    """Train `model` on random crops of `train_set`, evaluate on `test_set` every epoch, keep last.pt and best.pt.

    `epoch_transform(epoch)` may return a transform of each input batch for that epoch (e.g. ablation).
    Returns the summary also written to `out/metrics.json`.
    """
    train_counts = train_set.counts()
    if hasattr(model, "level_width"):  # CMTL's density levels span the training counts (MODELS.md §2.2)
        model.level_width.fill_(max(float(train_counts.max()) / 10, 1.0))
    model = prepare_model(model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
                        drop_last=len(train_set) > batch_size, pin_memory=device.type == "cuda")

    start, history, best = 0, [], float("inf")
    if resume:
        if not (out / "last.pt").is_file():
            raise ToolkitError(f"nothing to resume: {out / 'last.pt'} does not exist")
        state = load_run_checkpoint(out / "last.pt", model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        start, history, best = state["epoch"] + 1, state["history"], state["best"]
        print(f"resumed from {out / 'last.pt'} at epoch {start + 1}")

    baseline = mae(np.full(len(test_set), train_counts.mean()), test_set.counts())
    for epoch in range(start, epochs):
        transform = epoch_transform(epoch) if epoch_transform else None
        loss = train_one_epoch(model, loader, optimizer, device, scaler, amp, transform, desc=f"epoch {epoch + 1}")
        scheduler.step()
        metrics, rows, _ = evaluate(model, test_set, device, amp)
        history.append({"epoch": epoch + 1, "loss": loss, "mae": metrics["mae"], "mse": metrics["mse"]})
        print(f"epoch {epoch + 1}/{epochs}  loss {loss:.4f}  test MAE {metrics['mae']:.2f}  "
              f"RMSE {metrics['mse']:.2f}  (mean-count baseline MAE {baseline:.2f})")
        if all(r["pred"] == 0 for r in rows):
            print("warning: the model predicts exactly 0 everywhere (a dead final ReLU, as MCNN/CMTL's original init "
                  "can give); try another --seed or a lower --lr")
        extra = {"scheduler": scheduler.state_dict()}
        if metrics["mae"] < best:
            best = metrics["mae"]
            save_run_checkpoint(out / "best.pt", model, optimizer, epoch, record or {}, history, best, extra)
            save_csv(out / "per_image.csv", rows)
        save_run_checkpoint(out / "last.pt", model, optimizer, epoch, record or {}, history, best, extra)
        save_csv(out / "log.csv", history)

    if not history:
        raise ToolkitError(f"nothing to do: the run in {out} already finished {epochs} epochs")
    last = history[-1]
    summary = {"model": model.name, "epochs": len(history), "mae": last["mae"], "mse": last["mse"],
               "best_mae": best, "baseline_mae": baseline, "mae_over_baseline": last["mae"] / max(baseline, 1e-12),
               "train_images": len(train_set), "test_images": len(test_set)}
    save_json(out / "metrics.json", summary)
    curve_figure(out / "curves.png", {"train loss": [h["loss"] for h in history]}, ylabel="loss")
    curve_figure(out / "test_mae.png", {"test MAE": [h["mae"] for h in history],
                                        "mean-count baseline": [baseline] * len(history)}, ylabel="MAE")
    print(f"test MAE {last['mae']:.2f} vs mean-count baseline {baseline:.2f} "
          f"(ratio {summary['mae_over_baseline']:.3f}); run folder {out}")
    return summary

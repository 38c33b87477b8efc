"""Train a crowd-counting model (any of the five) on a ShanghaiTech-layout split or the synthetic crowds.

    python train.py --model mcnn                                   # synthetic default
    python train.py --model csrnet --data ShanghaiTech/part_A_final --epochs 400 --crop 256
    python train.py --model mcnn --out runs/train/a --resume       # continue from runs/train/a/last.pt
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.utils.data import DataLoader

from datasets.crowd import CrowdDataset
from models import build
from utils import cli
from utils.engine import evaluate, load_run_checkpoint, save_run_checkpoint, train_one_epoch
from utils.errors import ToolkitError
from utils.io import save_csv, save_json
from utils.metrics import mae
from utils.plots import curve_figure
from utils.runtime import pick_device, prepare_model, seed_everything


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser)
    cli.add_data_args(parser)
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=cli.positive_int, default=40)
    group.add_argument("--batch-size", type=cli.positive_int, default=4)
    group.add_argument("--crop", type=cli.positive_int, default=128, help="side of the random training crops")
    group.add_argument("--lr", type=cli.positive_float, default=1e-3, help="Adam's rate, cosine-annealed to 0")
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--resume", action="store_true", help="continue from <out>/last.pt (needs --out)")
    cli.add_run_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    if args.resume and args.out is None:
        raise ToolkitError("--resume needs --out, the run folder holding last.pt")
    out = cli.run_dir(args, "train")
    device = pick_device(args.device)
    seed_everything(args.seed)
    train_root, test_root = cli.resolve_splits(args.data, args.train_data, args.test_data)
    if train_root is None or test_root is None:
        raise ToolkitError("training needs both a train and a test split (--data, or --train-data and --test-data)")

    model = build(args.model, args.weights)
    train_set = CrowdDataset.for_model(train_root, model, density=args.density, crop=args.crop,
                                       max_images=args.max_train_images)
    test_set = CrowdDataset.for_model(test_root, model, density=args.density, max_images=args.max_test_images)
    train_counts = train_set.counts()
    if hasattr(model, "level_width"):  # CMTL's density levels span the training counts (MODELS.md §2.2)
        model.level_width.fill_(max(float(train_counts.max()) / 10, 1.0))
    model = prepare_model(model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=len(train_set) > args.batch_size, pin_memory=device.type == "cuda")

    start, history, best = 0, [], float("inf")
    if args.resume:
        if not (out / "last.pt").is_file():
            raise ToolkitError(f"nothing to resume: {out / 'last.pt'} does not exist")
        state = load_run_checkpoint(out / "last.pt", model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        start, history, best = state["epoch"] + 1, state["history"], state["best"]
        print(f"resumed from {out / 'last.pt'} at epoch {start + 1}")

    baseline = mae(np.full(len(test_set), train_counts.mean()), test_set.counts())
    for epoch in range(start, args.epochs):
        loss = train_one_epoch(model, loader, optimizer, device, scaler, args.amp, desc=f"epoch {epoch + 1}")
        scheduler.step()
        metrics, rows, _ = evaluate(model, test_set, device, args.amp)
        history.append({"epoch": epoch + 1, "loss": loss, "mae": metrics["mae"], "mse": metrics["mse"]})
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  test MAE {metrics['mae']:.2f}  "
              f"RMSE {metrics['mse']:.2f}  (mean-count baseline MAE {baseline:.2f})")
        if metrics["mae"] < best:
            best = metrics["mae"]
            save_run_checkpoint(out / "best.pt", model, optimizer, epoch, args, history, best,
                                {"scheduler": scheduler.state_dict()})
            save_csv(out / "per_image.csv", rows)
        save_run_checkpoint(out / "last.pt", model, optimizer, epoch, args, history, best,
                            {"scheduler": scheduler.state_dict()})
        save_csv(out / "log.csv", history)

    if not history:
        raise ToolkitError(f"nothing to do: the run in {out} already finished {args.epochs} epochs")
    last = history[-1]
    summary = {"model": args.model, "epochs": len(history), "mae": last["mae"], "mse": last["mse"],
               "best_mae": best, "baseline_mae": baseline, "mae_over_baseline": last["mae"] / max(baseline, 1e-12),
               "train_images": len(train_set), "test_images": len(test_set)}
    save_json(out / "metrics.json", summary)
    curve_figure(out / "curves.png", {"train loss": [h["loss"] for h in history]}, ylabel="loss")
    curve_figure(out / "test_mae.png", {"test MAE": [h["mae"] for h in history],
                                        "mean-count baseline": [baseline] * len(history)}, ylabel="MAE")
    print(f"test MAE {last['mae']:.2f} vs mean-count baseline {baseline:.2f} "
          f"(ratio {summary['mae_over_baseline']:.3f}); run folder {out}")
    return summary


if __name__ == "__main__":
    cli.run(main, get_args_parser())

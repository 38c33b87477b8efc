"""Evaluate a counting model on a split: MAE, RMSE, GAME(0..3), a per-image CSV and density figures.

    python evaluate.py --model mcnn --weights path/to/mcnn_shtechA_660.h5 \\
        --data ShanghaiTech/part_A_final/test_data --out runs/eval/mcnn_A
"""
from __future__ import annotations

import argparse
from pathlib import Path

from datasets.crowd import DENSITY_SOURCES, CrowdDataset
from models import build
from utils import cli, runs
from utils.engine import evaluate
from utils.errors import ToolkitError
from utils.io import save_csv, save_json
from utils.metrics import by_count
from utils.plots import density_figure
from utils.runtime import pick_device, prepare_model
from utils.text import plural
from utils.victims import synthetic_victim


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_model_args(parser, omitted="the model trained once on the synthetic crowds (cached); required with --data")
    group = cli.add_split_args(parser, "evaluate")
    group.add_argument("--density", default="adaptive", choices=DENSITY_SOURCES,
                       help="density maps used for the GAME targets: adaptive or fixed kernel from the head points, "
                            "or the ground_truth/IMG_<i>.h5 files scaled to the number of heads (the ground-truth "
                            "counts always come from the points)")
    group = parser.add_argument_group("output")
    group.add_argument("--figures", type=cli.non_negative_int, default=4,
                       help="write density figures (ground truth beside prediction) for the first N images")
    cli.add_run_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    runs.check_out(args, "evaluate")  # before the synthetic victim is trained (minutes, the first time)
    device = pick_device(args.device)
    if args.weights is None:
        if args.data is not None:
            raise ToolkitError("--weights is required with --data (an untrained model counts nothing); without "
                               "--data the model trained on the synthetic crowds is evaluated")
        args.weights = synthetic_victim(args.model, device)
    model = build(args.model, args.weights)
    split = cli.synthetic_splits()[1] if args.data is None else cli.check_split(args.data)
    dataset = CrowdDataset.for_model(split, model, density=args.density, max_images=args.max_images)
    out = cli.run_dir(args, "evaluate", device, data=split)
    model = prepare_model(model, device)

    metrics, rows, maps = evaluate(model, dataset, device, args.amp, keep_maps=args.figures, weights=args.weights)
    metrics.update(model=args.model, weights=str(args.weights), data=str(split),
                   by_count=by_count([r["pred"] for r in rows], [r["gt"] for r in rows]))
    save_csv(out / "per_image.csv", rows)
    save_json(out / "metrics.json", metrics)
    for row, (image, target, pred) in zip(rows, maps, strict=False):
        density_figure(out / "figures" / f"{Path(row['image']).stem}.{args.figure_format}", image,
                       [("ground-truth density", target), ("prediction", pred)], row["image"], truth=row["gt"])
    print(f"{plural(len(rows), 'image')}  MAE {metrics['mae']:.2f}  RMSE {metrics['rmse']:.2f}  "
          f"GAME(1..3) {metrics['game1']:.2f} / {metrics['game2']:.2f} / {metrics['game3']:.2f}  -> {out}")
    print("by ground-truth count: " + ";  ".join(
        f"{b['gt_from']}–{b['gt_below'] or ''}: {plural(b['images'], 'image')}, MAE {b['mae']:.1f}, bias "
        f"{b['bias']:+.1f}" for b in metrics["by_count"]))
    return metrics


if __name__ == "__main__":
    cli.run(main, get_args_parser())

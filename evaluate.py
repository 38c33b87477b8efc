"""Evaluate a counting model on a split: MAE, RMSE ("mse"), GAME(0..3), a per-image CSV and density figures.

    python evaluate.py --model mcnn --weights ../shared/weights/mcnn_shtechA_660.h5 \\
        --data ShanghaiTech/part_A_final/test_data --out runs/eval/mcnn_A
"""
from __future__ import annotations

import argparse
from pathlib import Path

from datasets.crowd import DENSITY_SOURCES, CrowdDataset
from models import build
from utils import cli
from utils.engine import evaluate
from utils.io import save_csv, save_json
from utils.plots import density_figure
from utils.runtime import pick_device, prepare_model, seed_everything


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_model_args(parser)
    parser.add_argument("--data", type=Path, help="a split folder (images/, ground_truth/); default: synthetic test")
    parser.add_argument("--density", default="adaptive", choices=DENSITY_SOURCES,
                        help="density used for the GAME targets (counts always come from the points)")
    parser.add_argument("--max-images", type=cli.positive_int, help="evaluate only the first N images")
    parser.add_argument("--figures", type=int, default=4, help="density figures for the first N images")
    cli.add_run_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    if args.weights is None:
        print("warning: no --weights given, evaluating a randomly initialised model")
    model = build(args.model, args.weights)
    split = cli.synthetic_splits()[1] if args.data is None else cli.check_split(args.data)
    dataset = CrowdDataset.for_model(split, model, density=args.density, max_images=args.max_images)
    out = cli.run_dir(args, "evaluate")
    device = pick_device(args.device)
    seed_everything(args.seed)
    model = prepare_model(model, device)

    metrics, rows, maps = evaluate(model, dataset, device, args.amp, keep_maps=args.figures)
    metrics.update(model=args.model, weights=str(args.weights), data=str(split))
    save_csv(out / "per_image.csv", rows)
    save_json(out / "metrics.json", metrics)
    for row, (image, target, pred) in zip(rows, maps, strict=False):
        density_figure(out / "figures" / f"{Path(row['image']).stem}.png", image,
                       [(f"ground truth ({row['gt']:.0f} heads)", target), ("prediction", pred)], row["image"])
    print(f"{len(rows)} images  MAE {metrics['mae']:.2f}  RMSE {metrics['mse']:.2f}  "
          f"GAME(1..3) {metrics['game1']:.2f} / {metrics['game2']:.2f} / {metrics['game3']:.2f}  -> {out}")
    return metrics


if __name__ == "__main__":
    cli.run(main, get_args_parser())

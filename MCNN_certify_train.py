"""Certified (randomized-ablation) training of a counting model, any of the five, as in the paper:
`--warmup-epochs` on clean crops, then every step on a fresh random ablation that keeps `--keep` units of each
image (a crop keeps the same fraction). Each epoch validates the clean count, one ablation per test image and
the smoothed count (median over `--val-samples` ablations); best.pt is the best smoothed MAE. Certify the result
with `certify.py --weights <run>/best.pt --keep K`.

    python MCNN_certify_train.py                                   # MCNN on the synthetic crowds, k = 45
    python MCNN_certify_train.py --data ShanghaiTech/part_A_final --keep 45 --epochs 800 --warmup-epochs 20 \\
        --lr 1e-4 --crop 256                                       # closer to the paper's recipe
"""
from __future__ import annotations

import argparse

import torch

from utils import cli, runs
from utils.ablation import FILL, UNITS, mean_units
from utils.recipes import AblationRecipe
from utils.training import fit, setup

# Synthetic default: within 10 CPU minutes on 2 cores (ablated steps learn slowly, so the warm-up is short)
DEFAULTS = {"epochs": 12, "batch_size": 4, "crop": 128, "lr": 1e-3, "warmup_epochs": 3, "val_samples": 5}


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_model_args(parser, omitted="training starts from a random initialisation")
    cli.add_data_args(parser)
    cli.add_training_args(parser, DEFAULTS)
    group = parser.add_argument_group("ablation")
    group.add_argument("--keep", type=cli.positive_int, default=45,
                       help="units kept per whole image (k); a crop keeps the same fraction of its units")
    group.add_argument("--unit", default="element", choices=UNITS,
                       help="ablation unit: element (one of the 3·H·W values) or pixel (one pixel, its 3 channels "
                            "together)")
    group.add_argument("--fill", type=cli.unit_interval, default=FILL,
                       help="value of the ablated units, in [0, 1] pixel units")
    group.add_argument("--warmup-epochs", type=int, default=DEFAULTS["warmup_epochs"],
                       help="clean epochs before ablation starts (the paper: 20)")
    group.add_argument("--val-samples", type=cli.positive_int, default=DEFAULTS["val_samples"],
                       help="ablations per test image for the smoothed validation count")
    cli.add_run_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    out, device, model, train_set, test_set = setup(args, "certify_train")
    reference = mean_units(test_set.sizes(), args.unit)
    recipe = AblationRecipe(args.keep, args.unit, args.fill, args.warmup_epochs, args.val_samples, reference,
                            generator=torch.Generator(device=device).manual_seed(args.seed))
    per_crop = recipe.keep_for((3, args.crop, args.crop))
    print(f"ablation: keep {args.keep} of {reference} {args.unit}s per image ({per_crop} "
          f"per {args.crop}x{args.crop} crop) after {args.warmup_epochs} clean epochs")
    summary = fit(model, train_set, test_set, out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  weight_decay=args.weight_decay, device=device, amp=args.amp, workers=args.workers,
                  resume=args.resume, record=runs.settings(args), seed=args.seed, recipe=recipe,
                  figure_format=args.figure_format)
    print(f"-> {out}")
    return summary


if __name__ == "__main__":
    cli.run(main, get_args_parser())

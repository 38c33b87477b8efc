"""Certified (randomized-ablation) training of a counting model, any of the six, as in the paper:
`--warmup-epochs` on clean crops, then every step on a fresh random ablation that keeps `--keep` units of each
image (a crop keeps the same fraction). Each epoch validates the clean count, one ablation per test image and
the smoothed count (median over `--val-samples` ablations); best.pt is the best smoothed MAE. Certify the result
with `certify.py --weights <run>/best.pt`: the checkpoint records the ablation it was trained with.

    python MCNN_certify_train.py                                   # MCNN on the synthetic crowds, k = 45
    python MCNN_certify_train.py --data ShanghaiTech/part_A_final --keep 45 --epochs 800 --warmup-epochs 20 \\
        --lr 1e-4 --crop 256                                       # closer to the paper's recipe
"""
from __future__ import annotations

import argparse

from utils import cli, runs
from utils.recipes import ABLATION_DEFAULTS as DEFAULTS
from utils.recipes import ablation_recipe
from utils.training import fit


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_model_args(parser, omitted="training starts from a random initialisation")
    cli.add_data_args(parser)
    cli.add_training_args(parser, DEFAULTS)
    group = cli.add_ablation_args(parser, trained=True)
    group.add_argument("--warmup-epochs", type=int, default=DEFAULTS["warmup_epochs"],
                       help="clean epochs before ablation starts (the paper: 20)")
    group.add_argument("--val-samples", type=cli.positive_int, default=DEFAULTS["val_samples"],
                       help="ablations per test image for the smoothed validation count")
    cli.add_run_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    out, device, model, train_set, val_set, test_set = cli.training_setup(args, "certify_train")
    recipe = ablation_recipe(test_set, args.keep, args.unit, args.fill, args.warmup_epochs, args.val_samples,
                             args.seed, device)
    spec = recipe.spec
    print(f"ablation: keep {spec.keep} of {spec.reference_units} {spec.unit}s per image "
          f"({spec.crop_keep((3, args.crop, args.crop))} per {args.crop}x{args.crop} crop) after "
          f"{args.warmup_epochs} clean epochs")
    summary = fit(model, train_set, val_set, test_set if args.score_test else None, out, epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, device=device,
                  amp=args.amp, workers=args.workers, resume=args.resume,
                  record=runs.settings(args), seed=args.seed, recipe=recipe,
                  figure_format=args.figure_format)
    print(f"-> {out}")
    return summary


if __name__ == "__main__":
    cli.run(main, get_args_parser())

"""Train a crowd-counting model (any of the six: the five classic networks and SmallField) on a ShanghaiTech-layout
dataset or the synthetic crowds.

    python train.py --model mcnn                                   # synthetic default
    python train.py --model csrnet --data ShanghaiTech/part_A_final --epochs 400 --crop 256
    python train.py --model mcnn --out runs/train/a --resume       # continue from runs/train/a/last.pt
"""
from __future__ import annotations

import argparse

from utils import cli, runs
from utils.training import DEFAULTS, Recipe, fit


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    group = cli.add_model_args(parser, omitted="training starts from a random initialisation")
    group.add_argument("--width", type=cli.positive_int,
                       help="SmallField's width, the channels of its first layer, for a model trained from scratch "
                            "(default 24; weights given to --weights keep their own)")
    group.add_argument("--blocks", type=cli.positive_int,
                       help="SmallField's 3x3 residual blocks at stride 4: each one beyond the first (the default) "
                            "widens the receptive field by 16 px, from 33; with --weights, the blocks beyond the "
                            "checkpoint's are added, each starting as the identity (the network counts as before)")
    group.add_argument("--no-batch-norm", dest="norm", action="store_false",
                       help="SmallField without batch norm (a bias per convolution), for a model trained from scratch: "
                            "no running statistics to move the count between epochs")
    cli.add_data_args(parser)
    group = cli.add_training_args(parser, DEFAULTS)
    group.add_argument("--erase", type=float, default=0.0,
                       help="probability, per training crop, of replacing a random rectangle by noise "
                            "(its heads removed from the target)")
    group.add_argument("--dense-crops", type=cli.unit_interval, default=0.0,
                       help="probability, per training crop, of drawing it around a head instead of uniformly "
                            "(more crops of dense scenes)")
    group.add_argument("--scales", type=cli.positive_float, nargs=2, metavar=("LOW", "HIGH"),
                       help="see each training crop at a scale drawn log-uniformly from [LOW, HIGH] (e.g. 0.7 1.4: a "
                            "window of side crop / scale, resized to the crop; its heads kept): a counter that does "
                            "not depend on one image scale and sharpness (default: no rescaling)")
    group.add_argument("--count-loss", type=cli.non_negative_float, default=0.0,
                       help="weight of each crop's absolute count error added to the density MSE (0: plain MSE)")
    group.add_argument("--ema", type=cli.below_one, default=0.0,
                       help="validate, keep and score an exponential moving average of the weights with this decay "
                            "per step (e.g. 0.99; 0: the weights as trained): it evens out the count's swing between "
                            "epochs")
    cli.add_run_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    out, device, model, train_set, val_set, test_set = cli.training_setup(args, "train", erase=args.erase,
                                                                           dense=args.dense_crops, scales=args.scales)
    summary = fit(model, train_set, val_set, test_set if args.score_test else None, out, epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, device=device,
                  amp=args.amp, workers=args.workers, resume=args.resume,
                  record=runs.settings(args), recipe=Recipe(args.count_loss), seed=args.seed,
                  figure_format=args.figure_format, ema=args.ema)
    print(f"-> {out}")
    return summary


if __name__ == "__main__":
    cli.run(main, get_args_parser())

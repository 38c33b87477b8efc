"""Train a crowd-counting model (any of the five) on a ShanghaiTech-layout split or the synthetic crowds.

    python train.py --model mcnn                                   # synthetic default
    python train.py --model csrnet --data ShanghaiTech/part_A_final --epochs 400 --crop 256
    python train.py --model mcnn --out runs/train/a --resume       # continue from runs/train/a/last.pt
"""
from __future__ import annotations

import argparse

from datasets.crowd import CrowdDataset
from models import build
from utils import cli
from utils.errors import ToolkitError
from utils.runtime import pick_device, seed_everything
from utils.training import DEFAULTS, fit


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(parser)
    cli.add_data_args(parser)
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=cli.positive_int, default=DEFAULTS["epochs"])
    group.add_argument("--batch-size", type=cli.positive_int, default=DEFAULTS["batch_size"])
    group.add_argument("--crop", type=cli.positive_int, default=DEFAULTS["crop"], help="side of the random crops")
    group.add_argument("--lr", type=cli.positive_float, default=DEFAULTS["lr"], help="Adam's rate, cosine-annealed")
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--erase", type=float, default=0.0, help="probability of random erasing with noise per crop")
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
                                       max_images=args.max_train_images, erase=args.erase)
    test_set = CrowdDataset.for_model(test_root, model, density=args.density, max_images=args.max_test_images)
    return fit(model, train_set, test_set, out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
               weight_decay=args.weight_decay, device=device, amp=args.amp, workers=args.workers,
               resume=args.resume, record=vars(args))


if __name__ == "__main__":
    cli.run(main, get_args_parser())

"""Adversarial training against a universal patch (the paper's ADT baseline), any of the six models: each step runs
`--attack-steps` APAM updates of the carried patch on the batch, then descends (1 − κ)·MSE(patched) + κ·MSE(clean),
κ on the paper's schedule (or a constant). Each epoch validates clean MAE / RMSE and MAE / RMSE under a fresh APAM
patch of the same size with a fixed budget (`utils.attack.attack_metrics`); best.pt is the most robust epoch
among those that trained on patches (κ < 1).

    python MCNN_adv_train.py                                     # fine-tunes the cached synthetic MCNN
    python MCNN_adv_train.py --data ShanghaiTech/part_A_final --epochs 800 --lr 1e-4 --patch-size 16 --crop 200 \\
        --attack-lr 1e-4 --batch-size 1                          # the paper's recipe, from scratch
"""
from __future__ import annotations

import argparse

from utils import cli, runs
from utils.attack import DEFAULT_SIDE, TARGETS, APAMConfig
from utils.io import save_json
from utils.recipes import ADVERSARIAL_DEFAULTS, adversarial_recipe
from utils.training import fit
from utils.victims import synthetic_victim

DEFAULTS = ADVERSARIAL_DEFAULTS  # on the synthetic default: fine-tunes the cached victim in a few CPU minutes


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_model_args(parser, omitted="with no data given, the cached --model victim trained on the synthetic "
                       "crowds (fine-tuned); with your own data, a random initialisation")
    cli.add_data_args(parser)
    cli.add_training_args(parser, DEFAULTS)
    group = parser.add_argument_group("adversarial training")
    group.add_argument("--kappa", default=DEFAULTS["kappa"],
                       help="weight κ of the clean loss: a constant in [0, 1], or 'paper': 1 for the first 1/16 of "
                            "the epochs, then linearly down to 0.5 at half of them, then 0.5")
    group.add_argument("--attack-steps", type=int, default=DEFAULTS["attack_steps"],
                       help="APAM updates of the patch per training step")
    group.add_argument("--target", default="pred-scale", choices=TARGETS,
                       help="the attack's objective, as in patch_attack.py; the paper's: gt-scale with --tau -1")
    group.add_argument("--tau", type=float, default=10.0, help="target scale τ for pred-scale and gt-scale")
    group.add_argument("--attack-lr", type=cli.positive_float, default=DEFAULTS["attack_lr"],
                       help="APAM step η, in [0, 1] pixel units (at 0.01 the co-evolving patch grows so strong that "
                            "the model learns to undercount everything)")
    group.add_argument("--val-attack-epochs", type=cli.positive_int, default=DEFAULTS["val_epochs"],
                       help="passes of each fresh validation patch over crops of the validation images")
    group.add_argument("--val-attack-restarts", type=cli.positive_int, default=DEFAULTS["val_restarts"],
                       help="fresh validation patches per epoch; the strongest counts")
    group = parser.add_argument_group("patch (of the attack during training and of the validation probes)")
    group.add_argument("--patch-size", type=cli.positive_int, default=DEFAULT_SIDE, help="patch side, in pixels")
    cli.add_patch_args(parser, group)
    cli.add_run_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    runs.check_out(args, "adv_train")  # before the synthetic victim is trained (minutes, the first time)
    if args.weights is None and not (args.data or args.train_data or args.test_data):
        args.weights = synthetic_victim(args.model, seed=args.seed)  # the synthetic default: fine-tune the victim
    out, device, model, train_set, val_set, test_set = cli.training_setup(args, "adv_train")
    spec = cli.patch_spec(args, args.patch_size)
    spec.check_fits(train_set.smallest_side(), "the training crops")
    spec.check_fits(test_set.smallest_side(), "the smallest test image")
    config = APAMConfig(target=args.target, tau=args.tau, lr=args.attack_lr)
    recipe = adversarial_recipe(val_set or train_set, spec, config, crop=args.crop, attack_steps=args.attack_steps,
                                kappa_spec=args.kappa, epochs=args.epochs, val_epochs=args.val_attack_epochs,
                                val_restarts=args.val_attack_restarts, seed=args.seed, device=device, amp=args.amp)
    start = None
    if not args.resume and val_set is not None:
        model.to(device)
        start, _ = recipe.validate(model, val_set, device, args.amp, 0)
        print(f"start model, on the validation part: clean MAE {start['clean_mae']:.2f}, MAE "
              f"{start['attacked_mae']:.2f} under a fresh {args.patch_size}px patch")
    summary = fit(model, train_set, val_set, test_set if args.score_test else None, out, epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, device=device,
                  amp=args.amp, workers=args.workers, resume=args.resume,
                  record=runs.settings(args), seed=args.seed, recipe=recipe,
                  figure_format=args.figure_format)
    if start is not None:
        summary["start"] = start
        if summary["best_epoch"] is not None:
            chosen, last = summary["validation"], summary["last"]
            print(f"validation part, attacked MAE: start model {start['attacked_mae']:.2f} (clean "
                  f"{start['clean_mae']:.2f}) -> best.pt, epoch {summary['best_epoch']}: {chosen['attacked_mae']:.2f} "
                  f"(clean {chosen['clean_mae']:.2f}); last epoch {last['attacked_mae']:.2f} (clean "
                  f"{last['clean_mae']:.2f})")
    if args.score_test:
        print(f"test split, {summary['checkpoint']}: clean MAE {summary['clean_mae']:.2f}, MAE "
              f"{summary['attacked_mae']:.2f} under a fresh {args.patch_size}px patch")
    save_json(out / "metrics.json", summary)
    print(f"-> {out}")
    return summary


if __name__ == "__main__":
    cli.run(main, get_args_parser())

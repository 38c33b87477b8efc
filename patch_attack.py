"""APAM: optimise one universal adversarial patch against a counting model on a train split, then measure how
far it moves the model's counts on a test split (against a random-noise patch of the same size as control).

    python patch_attack.py                        # synthetic crowds, an MCNN trained on them (cached)
    python patch_attack.py --model mcnn --weights path/to/mcnn_shtechA_660.h5 \\
        --train-data ShanghaiTech/part_A_final/train_data --test-data ShanghaiTech/part_A_final/test_data \\
        --patch-size 81 --epochs 20
    python patch_attack.py --weights path/to/mcnn_shtechA_660.h5 --patch runs/patch_attack/<run>/patch.pt \\
        --test-data ShanghaiTech/part_A_final/test_data            # evaluate a saved patch
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from datasets.crowd import CrowdDataset
from models import MODEL_NAMES, build, load_weights
from utils import cli, runs
from utils.attack import (
    DEFAULT_SIDE,
    MOMENTUM_FORMS,
    TARGETS,
    APAMConfig,
    evaluate_patch,
    optimise_patch,
    patch_metrics,
)
from utils.errors import ToolkitError
from utils.io import save_csv, save_json
from utils.patch import PLACEMENTS, SHAPES, PatchTransform, load_patch, make_mask, patch_side, random_patch, save_patch
from utils.plots import curve_figure, density_figure
from utils.runtime import pick_device, prepare_model, seed_everything
from utils.victims import synthetic_victim


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_model_args(parser, omitted="with no data given, the cached --model victim trained on the synthetic "
                       "crowds; required with your own data")
    cli.add_data_args(parser)
    group = parser.add_argument_group("patch")
    size = group.add_mutually_exclusive_group()
    size.add_argument("--patch-size", type=cli.positive_int,
                      help=f"patch side in pixels; when neither this nor --patch-frac is given: {DEFAULT_SIDE} "
                           f"(a {DEFAULT_SIDE}-pixel circle covers 2 %% of a 240×320 image)")
    size.add_argument("--patch-frac", type=cli.positive_float,
                      help="patch side as a fraction of 1024 pixels, as in the paper: 0.02/0.04/0.08/0.16 give "
                           "20/40/81/163 pixels")
    group.add_argument("--patch-shape", default="circle", choices=SHAPES, help="mask of the patch")
    group.add_argument("--placement", default="center", choices=PLACEMENTS[:2],
                       help="where the patch goes while it is optimised: the image centre, or a random position "
                            "per image (plus a small random rotation, scale and brightness change)")
    group.add_argument("--patch", type=Path,
                       help="evaluate this saved patch.pt (from an earlier run) instead of optimising one")
    group = parser.add_argument_group("APAM (optimisation on the train split)")
    group.add_argument("--target", default="pred-scale", choices=TARGETS,
                       help="objective: pull the density towards τ × the clean prediction (pred-scale), τ × the "
                            "ground truth (gt-scale) or zero (zero), or maximize / minimize the count")
    group.add_argument("--tau", type=float, default=10.0, help="target scale τ for pred-scale and gt-scale")
    group.add_argument("--epochs", type=cli.positive_int, default=6, help="passes over the train split")
    group.add_argument("--steps", type=cli.positive_int, default=1, help="APAM updates of the patch per batch")
    group.add_argument("--lr", type=cli.positive_float, default=0.01,
                       help="step size η of each update, in [0, 1] pixel units")
    group.add_argument("--momentum", type=float, default=0.9, help="momentum ζ")
    group.add_argument("--momentum-form", default="mifgsm", choices=MOMENTUM_FORMS,
                       help="mifgsm: v = ζ·v + g/‖g‖₁, step η·sign(v); paper: the paper's literal rule "
                            "V = ζ·p + (1 − ζ)·g/‖g‖₁, step η·V")
    group.add_argument("--tv-weight", type=float, default=0.0,
                       help="weight γ of the patch's total variation in the loss (smoother patches)")
    group.add_argument("--crop", type=cli.positive_int,
                       help="optimise on random crops of this side, in pixels; omitted: whole images")
    group.add_argument("--batch-size", type=cli.positive_int, default=8,
                       help="images (or crops) per update, and per evaluation batch")
    group = parser.add_argument_group("evaluation (on the test split)")
    group.add_argument("--eval-placement", choices=PLACEMENTS,
                       help="where the patch goes on the test images; omitted: --placement; sweep tries a grid of "
                            "positions per image and keeps the worst")
    group.add_argument("--eval-models",
                       help="also evaluate the patch on other models (transfer): comma-separated name=weights "
                            "pairs, e.g. csrnet=path/to/csrnet.pth,can=path/to/can.pth")
    group.add_argument("--figures", type=int, default=4,
                       help="write density figures (clean beside attacked) for the first N test images")
    cli.add_run_args(parser)
    return parser


def _transfer(spec: str, patch, mask, placement, transform, test_root: Path, device, args) -> dict:
    table = {}
    for item in spec.split(","):
        name, _, weights = item.partition("=")
        if name.lower() not in MODEL_NAMES or not weights:
            raise ToolkitError(f"--eval-models takes name=weights pairs with a name in {', '.join(MODEL_NAMES)}; "
                               f"got {item!r}")
        model = prepare_model(build(name, weights).requires_grad_(False), device).eval()
        dataset = CrowdDataset.for_model(test_root, model, density=args.density, max_images=args.max_test_images)
        rows, _ = evaluate_patch(model, dataset, patch, mask, placement, transform, device, args.batch_size,
                                 args.seed, args.amp)
        table[f"{name}={weights}"] = patch_metrics(rows)
    return table


def main(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    train_root, test_root = cli.resolve_splits(args.data, args.train_data, args.test_data)
    if test_root is None:
        raise ToolkitError("a test split is needed (--test-data or --data)")
    if args.weights is None and (args.data or args.train_data or args.test_data):
        raise ToolkitError("--weights is required with your own data (the default victim is for synthetic data)")
    model = build(args.model)  # the architecture shapes the data; its weights are loaded once the inputs are checked
    test_set = CrowdDataset.for_model(test_root, model, density=args.density, max_images=args.max_test_images)
    transform = PatchTransform()
    config = APAMConfig(target=args.target, tau=args.tau, lr=args.lr, momentum=args.momentum,
                        momentum_form=args.momentum_form, tv_weight=args.tv_weight, placement=args.placement,
                        transform=transform)

    if args.patch is not None:
        saved = load_patch(args.patch)
        patch, mask, shape = saved["patch"], saved["mask"], saved["shape"]
        if (args.patch_size or args.patch_frac) and patch.shape[-1] != (args.patch_size or patch_side(args.patch_frac)):
            raise ToolkitError(f"{args.patch} holds a {patch.shape[-1]}-pixel patch, not the size asked for")
        transform = PatchTransform(**saved.get("transform", {}))
    else:
        size = args.patch_size or (patch_side(args.patch_frac) if args.patch_frac else DEFAULT_SIDE)
        shape = args.patch_shape
        patch, mask = random_patch(size, torch.Generator().manual_seed(args.seed)), make_mask(size, shape)
    size = patch.shape[-1]
    smallest = test_set.smallest_side()
    if size > smallest:
        raise ToolkitError(f"patch side {size} is larger than the smallest test image side ({smallest} px)")
    if args.patch is None:
        if train_root is None:
            raise ToolkitError("a train split is needed to optimise the patch (--train-data or --data)")
        train_set = CrowdDataset.for_model(train_root, model, density=args.density, crop=args.crop,
                                           max_images=args.max_train_images)
        if size > train_set.smallest_side():
            raise ToolkitError(f"patch side {size} is larger than the smallest training image or crop")

    args.weights = args.weights or synthetic_victim(args.model, device)
    load_weights(model, args.weights)
    model = prepare_model(model.requires_grad_(False), device).eval()
    seed_everything(args.seed)
    patch, mask = patch.to(device), mask.to(device)
    out = cli.run_dir(args, "patch_attack", device, patch_size=size, train_data=train_root, test_data=test_root)

    losses = []
    if args.patch is None:
        patch, losses = optimise_patch(model, train_set, patch, mask, config, device, args.epochs, args.steps,
                                       args.batch_size, args.seed, args.amp)
        save_patch(out, patch, mask, shape, transform, {"args": runs.settings(args)})
        curve_figure(out / f"loss.{args.figure_format}", {"APAM loss": losses}, ylabel=f"APAM loss ({args.target})",
                     title=f"APAM loss per epoch ({size} px {shape} patch)")

    placement = args.eval_placement or args.placement
    rows, maps = evaluate_patch(model, test_set, patch, mask, placement, transform, device, args.batch_size, args.seed,
                                args.amp, args.figures)
    metrics = patch_metrics(rows)
    covered = float(mask.sum()) / (sum(h * w for h, w in test_set.sizes()) / len(test_set))
    metrics.update(patch={"size": size, "shape": shape, "area_fraction": covered, "placement": placement},
                   model=args.model, weights=str(args.weights), losses=losses)
    if args.eval_models:
        metrics["transfer"] = _transfer(args.eval_models, patch, mask, placement, transform, test_root, device, args)
    save_csv(out / "per_image.csv", rows)
    save_json(out / "metrics.json", metrics)
    truth = {r["image"]: r["gt"] for r in rows}
    for name, patched, clean, attacked in maps:
        density_figure(out / "figures" / f"{Path(name).stem}.{args.figure_format}", patched,
                       [("clean", clean), ("attacked", attacked)], f"{name} (patched)", truth=truth[name])
    c, a, n = metrics["clean"], metrics["attacked"], metrics["control"]
    print(f"patch {size}px {shape} ({covered:.2%} of the pixels), {len(rows)} test images\n"
          f"  clean    MAE {c['mae']:8.2f}  RMSE {c['mse']:8.2f}\n"
          f"  attacked MAE {a['mae']:8.2f}  RMSE {a['mse']:8.2f}  mean shift {a['mean_shift']:+.2f}\n"
          f"  control  MAE {n['mae']:8.2f}  RMSE {n['mse']:8.2f}  mean shift {n['mean_shift']:+.2f}\n"
          f"  -> {out}")
    return metrics


if __name__ == "__main__":
    cli.run(main, get_args_parser())

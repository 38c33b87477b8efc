"""APAM: optimise one universal adversarial patch against a counting model on a train split, then measure how
far it moves the model's counts on a test split (against a random-noise patch of the same size as control).

    python patch_attack.py                        # synthetic crowds, an MCNN trained on them (cached)
    python patch_attack.py --model mcnn --weights path/to/mcnn_shtechA_660.h5 \\
        --train-data ShanghaiTech/part_A_final/train_data --test-data ShanghaiTech/part_A_final/test_data \\
        --patch-size 81 --epochs 20
    python patch_attack.py --weights path/to/mcnn_shtechA_660.h5 --patch runs/patch_attack/<run>/patch.pt \\
        --test-data ShanghaiTech/part_A_final/test_data            # evaluate a saved patch
    python patch_attack.py --weights path/to/mcnn_shtechA_660.h5 --counter rf-mask \\
        --calibration runs/certify/<run>/calibration.json --target maximize --eval-placement sweep ...
"""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

from datasets.crowd import CrowdDataset
from models import DISPLAY_NAMES, MODEL_NAMES, build
from models.receptive_field import receptive_field
from models.weights import WrongModel
from utils import cli, runs
from utils.ablation import AblationSpec
from utils.attack import (
    DEFAULT_SIDE,
    MOMENTUM_FORMS,
    TARGETS,
    APAMConfig,
    evaluate_patch,
    optimise_patch,
    patch_metrics,
)
from utils.certify import AblationCertifier, Certifier
from utils.errors import ToolkitError
from utils.io import load_checkpoint, save_csv, save_json
from utils.local_eval import local_counter
from utils.patch import PLACEMENTS, PatchSpec, load_patch, patch_side, random_patch, save_patch
from utils.plots import curve_figure, density_figure
from utils.rf_certify import RFClipCertifier, RFMaskCertifier, load_calibration
from utils.runtime import pick_device, prepare_model
from utils.text import plural
from utils.victims import synthetic_victim

COUNTERS = ("model", "ablation", "rf-clip", "rf-mask")


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
    cli.add_patch_args(parser, group)
    group.add_argument("--patch", type=Path,
                       help="evaluate this saved patch.pt (from an earlier run) instead of optimising one, applied as "
                            "it was made (its side, shape, transforms and placement)")
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
    group.add_argument("--figures", type=cli.non_negative_int, default=4,
                       help="write density figures (clean beside attacked) for the first N test images")
    group = parser.add_argument_group("certified counter under attack (default: the model's own count)")
    group.add_argument("--counter", default="model", choices=COUNTERS,
                       help="attack and count through a certified counter of the model: ablation (the smoothed "
                            "count, with the ablation its checkpoint records), rf-clip or rf-mask")
    group.add_argument("--calibration", type=Path,
                       help="rf-clip / rf-mask: the calibration.json of a certify.py run of this model")
    group.add_argument("--eot", type=cli.positive_int, default=2,
                       help="ablation: ablations per image in each attack step (expectation over ablations)")
    group.add_argument("--counter-samples", type=cli.positive_int, default=8,
                       help="ablation: ablations per image for the smoothed count")
    cli.add_run_args(parser)
    return parser


def _transfer(pairs: str, patch: torch.Tensor, spec: PatchSpec, placement: str, test_root: Path,
              device: torch.device, args: argparse.Namespace) -> dict:
    table = {}
    for item in pairs.split(","):
        name, _, weights = item.partition("=")
        if name.lower() not in MODEL_NAMES or not weights:
            raise ToolkitError(f"--eval-models takes name=weights pairs with a name in {', '.join(MODEL_NAMES)}; "
                               f"got {item!r}")
        try:
            model = build(name, weights)
        except WrongModel as e:  # its message offers --model, which names the attacked model here
            raise ToolkitError(f"--eval-models {item}: {weights} holds {DISPLAY_NAMES[e.holds]} weights; give "
                               f"{e.holds}={weights}") from None
        model = prepare_model(model.requires_grad_(False), device).eval()
        dataset = CrowdDataset.for_model(test_root, model, density=args.density, max_images=args.max_test_images)
        rows, _ = evaluate_patch(model, dataset, patch, spec, device, placement, args.batch_size, args.seed, args.amp)
        table[f"{name}={weights}"] = patch_metrics(rows)
    return table


def _certifier(args: argparse.Namespace, model, device: torch.device) -> Certifier:
    """The certified counter --counter names, as certify.py certifies it."""
    if args.counter == "ablation":
        spec = AblationSpec.from_checkpoint(load_checkpoint(args.weights)) if args.weights.suffix != ".h5" else None
        if spec is None:
            raise ToolkitError(f"--counter ablation needs a checkpoint of MCNN_certify_train.py; {args.weights} "
                               "records no ablation")
        return AblationCertifier(spec, args.counter_samples, generator=torch.Generator(device=device).manual_seed(
            args.seed), eot=args.eot)
    if args.calibration is None:
        raise ToolkitError(f"--counter {args.counter} needs --calibration, the calibration.json of a certify.py run")
    certifier, rf = RFClipCertifier if args.counter == "rf-clip" else RFMaskCertifier, receptive_field(model)
    return certifier(rf, load_calibration(args.calibration, rf))


def _spec(args: argparse.Namespace) -> tuple[torch.Tensor, PatchSpec]:
    """(starting or saved patch, its spec): a saved patch keeps the spec it was made with; a patch flag that
    contradicts it is an error."""
    if args.patch is None:
        side = args.patch_size or (patch_side(args.patch_frac) if args.patch_frac else DEFAULT_SIDE)
        spec = cli.patch_spec(args, side)
        return random_patch(spec.side, torch.Generator().manual_seed(args.seed)), spec
    patch, spec = load_patch(args.patch)
    given = getattr(args, "_given", frozenset())
    side = args.patch_size or (patch_side(args.patch_frac) if args.patch_frac else spec.side)
    asked = cli.patch_spec(args, side)
    for flag, dests, saved, value in (("--patch-size", {"patch_size", "patch_frac"}, spec.side, asked.side),
                                      ("--patch-shape", {"patch_shape"}, spec.shape, asked.shape),
                                      ("--placement", {"placement"}, spec.placement, asked.placement),
                                      ("--rotation/--scale/--brightness", {"rotation", "scale", "brightness"},
                                       spec.transform, asked.transform)):
        if given & dests and saved != value:
            raise ToolkitError(f"{args.patch} was made with {flag} {saved}, not {value}; leave {flag} out")
    return patch, spec


def _check_counter(args: argparse.Namespace) -> None:
    """The certified counter's flags and files, checked before the victim is trained and the patch optimised (the
    calibration's receptive field, which takes seconds to measure, once the model is built: `_certifier`)."""
    from utils.rf_certify import Calibration

    if args.counter == "ablation" and args.weights is None:
        raise ToolkitError("--counter ablation needs --weights, a checkpoint of MCNN_certify_train.py (the synthetic "
                           "victim was not trained with ablation)")
    if args.counter in ("rf-clip", "rf-mask"):
        if args.calibration is None:
            raise ToolkitError(f"--counter {args.counter} needs --calibration, the calibration.json of a certify.py "
                               "run")
        Calibration.load(args.calibration)


def main(args: argparse.Namespace) -> dict:
    runs.check_out(args, "patch_attack")  # --out first: the victim training and the attack come after every check
    device = pick_device(args.device)
    train_root, test_root = cli.resolve_splits(args.data, args.train_data, args.test_data)
    if test_root is None:
        raise ToolkitError("a test split is needed (--test-data or --data)")
    if args.weights is None and (args.data or args.train_data or args.test_data):
        raise ToolkitError("--weights is required with your own data (the default victim is for synthetic data)")
    model = build(args.model)  # the architecture shapes the data; its weights are loaded once the inputs are checked
    _check_counter(args)
    test_set = CrowdDataset.for_model(test_root, model, density=args.density, max_images=args.max_test_images)
    patch, spec = _spec(args)
    spec.check_fits(test_set.smallest_side(), "the smallest test image side")
    if args.patch is None:
        if train_root is None:
            raise ToolkitError("a train split is needed to optimise the patch (--train-data or --data)")
        train_set = CrowdDataset.for_model(train_root, model, density=args.density, crop=args.crop,
                                           max_images=args.max_train_images)
        spec.check_fits(train_set.smallest_side(), "the smallest training image or crop")

    args.weights = args.weights or synthetic_victim(args.model, device, seed=args.seed)
    model = build(args.model, args.weights)  # with a checkpoint's own build options (SmallField's width)
    model = prepare_model(model.requires_grad_(False), device).eval()
    placement = args.eval_placement or spec.placement
    sweep = placement == "sweep"  # each placement evaluated where the patch reaches (`utils.local_eval`)
    through, counter = model, local_counter(model) if sweep else model
    if args.counter != "model":  # the certified counter, for the patch as the certificate covers it
        certifier = _certifier(args, model, device)
        side = certifier.covered_side(spec)
        through = partial(certifier.attack_density, model, side=side)
        counter = certifier.local_counter(model, side) if sweep else \
            partial(certifier.density, model, side=side)
        certifier.density(model, test_set[0][0][None].to(device), side)  # fail now, not after APAM
    patch = patch.to(device)
    out = cli.run_dir(args, "patch_attack", device, patch_size=spec.side, patch_shape=spec.shape,
                      placement=spec.placement, rotation=spec.transform.rotation,
                      scale=[spec.transform.scale_min, spec.transform.scale_max],
                      brightness=spec.transform.brightness, train_data=train_root, test_data=test_root)

    losses = []
    if args.patch is None:
        config = APAMConfig(target=args.target, tau=args.tau, lr=args.lr, momentum=args.momentum,
                            momentum_form=args.momentum_form, tv_weight=args.tv_weight)
        patch, losses = optimise_patch(through, train_set, patch, spec, config, device, args.epochs, args.steps,
                                       args.batch_size, args.seed, args.amp)
        save_patch(out, patch, spec, {"args": runs.settings(args)})
        curve_figure(out / f"loss.{args.figure_format}", {"APAM loss": losses}, ylabel=f"APAM loss ({args.target})",
                     title=f"APAM loss per epoch ({spec.side} px {spec.shape} patch)")

    rows, maps = evaluate_patch(counter, test_set, patch, spec, device, placement, args.batch_size, args.seed, args.amp,
                                args.figures)
    metrics = patch_metrics(rows)
    covered = float(spec.mask.sum()) / (sum(h * w for h, w in test_set.sizes()) / len(test_set))
    metrics.update(counter=args.counter, model=args.model, weights=str(args.weights), losses=losses,
                   patch={"size": spec.side, "shape": spec.shape, "area_fraction": covered, "placement": placement,
                          "spec": spec.to_dict()})
    if args.eval_models:
        metrics["transfer"] = _transfer(args.eval_models, patch, spec, placement, test_root, device, args)
    save_csv(out / "per_image.csv", rows)
    save_json(out / "metrics.json", metrics)
    truth = {r["image"]: r["gt"] for r in rows}
    for name, patched, clean, attacked in maps:
        density_figure(out / "figures" / f"{Path(name).stem}.{args.figure_format}", patched,
                       [("clean", clean), ("attacked", attacked)], f"{name} (patched)", truth=truth[name])
    c, a, n = metrics["clean"], metrics["attacked"], metrics["control"]
    print(f"patch {spec.side}px {spec.shape} ({covered:.2%} of the pixels), {plural(len(rows), 'test image')} "
          f"(mean count {metrics['mean_gt']:.1f})\n"
          f"  clean    MAE {c['mae']:8.2f}  RMSE {c['rmse']:8.2f}  mean error {c['bias']:+.2f}\n"
          f"  attacked MAE {a['mae']:8.2f}  RMSE {a['rmse']:8.2f}  mean shift {a['mean_shift']:+.2f}\n"
          f"  control  MAE {n['mae']:8.2f}  RMSE {n['rmse']:8.2f}  mean shift {n['mean_shift']:+.2f}\n"
          f"  the patch moves the counts by {a['shift_vs_control']:+.2f} on average against the noise control "
          f"({a['shift_vs_control'] / max(c['mae'], 1e-12):.1f}x the clean MAE); attacked MAE "
          f"{a['mae'] / max(c['mae'], 1e-12):.2f}x the clean\n"
          f"  -> {out}")
    return metrics


if __name__ == "__main__":
    cli.run(main, get_args_parser())

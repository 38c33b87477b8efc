"""Certified count bounds of an ablation-trained model against any patch of the given sizes, placed anywhere.

The smoothed count is the median of the model's count over N random ablations of the image (each keeps k of its
d units). For a patch of side s covering ρ units (3s² elements or s² pixels), Δ = 1 − C(d−ρ, k)/C(d, k) bounds how
far the patch can move the ablated-count distribution, so the attacked median lies in [L, U] (order statistics of
the N clean samples) with confidence 1 − α. Tight-MAE / MSE (our definition): per image with true count c the worst
error inside the certificate, max(|L − c|, |U − c|); its mean / root mean square over the certified images.
The ablation (k, unit, fill) is the one the model's checkpoint records; --keep, --unit and --fill override it.

    python certify.py --model mcnn --weights runs/certify_train/<run>/best.pt \\
        --data ShanghaiTech/part_A_final/test_data
    python certify.py --bound-table --d 2150400 --keep 45 --patch-sizes 20 40 81 163
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from datasets.crowd import CrowdDataset
from models import build
from models.weights import read_weights_file
from utils import cli
from utils.ablation import AblationSpec
from utils.certify import bound_table, certify_dataset
from utils.errors import ToolkitError
from utils.io import save_csv, save_json
from utils.patch import PatchSpec, PatchTransform
from utils.plots import interval_figure
from utils.runtime import pick_device, prepare_model


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_model_args(parser, omitted="required (except with --bound-table)")
    group = cli.add_split_args(parser, "certify")
    cli.add_ablation_args(parser, trained=False)
    group = parser.add_argument_group("certificate")
    group.add_argument("--samples", type=int, default=1000, help="ablations per image (N)")
    group.add_argument("--alpha", type=float, default=0.05, help="1 − confidence of the ablation certificate")
    group.add_argument("--patch-sizes", type=cli.positive_int, nargs="+", default=[20, 40, 81, 163],
                       help="sides s of the square patches to certify against, in pixels")
    group.add_argument("--batch-size", type=cli.positive_int, default=64,
                       help="ablations per forward pass (lower it if memory runs out)")
    group = parser.add_argument_group("bound table (no model or data needed)")
    group.add_argument("--bound-table", action="store_true",
                       help="print, per patch size, C(d−ρ, k)/C(d, k) (an ablation misses the patch) and "
                            "C(ρ, k)/C(d, k) (all its kept units lie in the patch) for --d, --keep and --unit, "
                            "then exit")
    group.add_argument("--d", type=cli.positive_int,
                       help="units d of an image for --bound-table: 3·H·W elements or H·W pixels "
                            "(e.g. 2150400 for 1024×700 in elements)")
    cli.add_run_args(parser)
    return parser


def print_bound_table(d: int, keep: int, sides: list[int], unit: str) -> list[dict]:
    rows = bound_table(d, keep, sides, unit)
    print(f"d = {d}, k = {keep}, unit = {unit}")
    print(f"{'side':>6} {'rho':>9} {'upper C(d-rho,k)/C(d,k)':>26} {'lower C(rho,k)/C(d,k)':>24}")
    for r in rows:
        print(f"{r['side']:>6} {r['rho']:>9} {r['upper']:>26.4f} {r['lower']:>24.3e}")
    return rows


def trained_ablation(weights: Path) -> AblationSpec | None:
    """The ablation a checkpoint of ours records; None (with a warning) for weights not trained with ablation."""
    state = read_weights_file(Path(weights))
    trained = AblationSpec.from_checkpoint(state) if isinstance(state, dict) and "state_dict" in state else None
    if trained is None:
        print(f"warning: {weights} was not trained with ablation; the certificate holds but will be loose")
    return trained


def main(args: argparse.Namespace) -> dict:
    if not 0 < args.alpha < 1:
        raise ToolkitError(f"--alpha must lie in (0, 1), got {args.alpha}")
    if args.samples < 1:
        raise ToolkitError(f"--samples must be at least 1, got {args.samples}")
    if args.bound_table:
        if args.d is None:
            raise ToolkitError("--bound-table needs --d, the number of units")
        spec = cli.ablation_spec(args, None)
        return {"bound_table": print_bound_table(args.d, spec.keep, args.patch_sizes, spec.unit)}

    if args.weights is None:
        raise ToolkitError("--weights is required: the model to certify (e.g. runs/certify_train/<run>/best.pt)")
    device = pick_device(args.device)
    model = build(args.model, args.weights)
    spec = cli.ablation_spec(args, trained_ablation(args.weights))
    split = cli.synthetic_splits()[1] if args.data is None else cli.check_split(args.data)
    dataset = CrowdDataset.for_model(split, model, max_images=args.max_images)
    spec.check_fits(dataset.sizes())
    for side in args.patch_sizes:  # the threat: an s×s square anywhere
        PatchSpec(side, "square", PatchTransform.none()).check_fits(dataset.smallest_side(), "the smallest image side")
    out = cli.run_dir(args, "certify", device, data=split, keep=spec.keep, unit=spec.unit, fill=spec.fill)
    model = prepare_model(model, device).eval()
    generator = torch.Generator(device=device).manual_seed(args.seed)

    rows, metrics = certify_dataset(model, dataset, spec, args.samples, args.patch_sizes, args.alpha, args.batch_size,
                                    device, args.amp, generator)
    save_csv(out / "per_image.csv", rows)
    save_json(out / "metrics.json", metrics)
    interval_figure(out / f"intervals.{args.figure_format}", rows, args.patch_sizes)
    print(f"smoothed counts: MAE {metrics['smoothed']['mae']:.2f}  RMSE {metrics['smoothed']['mse']:.2f}")
    for s, m in metrics["patch_sizes"].items():
        print(f"  patch {s:>4}px: certified {m['certified_fraction']:.0%}  tight-MAE {m['tight_mae']:.2f}  "
              f"tight-MSE {m['tight_mse']:.2f}  mean width {m['mean_width']:.2f}")
    print(f"-> {out}")
    return metrics


if __name__ == "__main__":
    cli.run(main, get_args_parser())

"""Certified counting: per image the certified counter's count and an interval [L, U] that holds it under any
patch of the given sizes placed anywhere, with tight-MAE / RMSE (our definition: per image with true count c the worst
error inside the certificate, max(|L − c|, |U − c|); its mean / root mean square over the certified images).

Methods (--method):
  ablation  the median count over N random ablations (each keeps k of the image's d units); Δ = 1 − C(d−ρ, k)/C(d, k)
            bounds how far a patch covering ρ units can move it, so [L, U] are order statistics of the N clean
            samples, with confidence 1 − α. The ablation (k, unit, fill) is the one the checkpoint records.
  rf-clip   the count of the density clipped to [0, dmax]; a patch can change only the output cells whose receptive
            field it reaches, one window of them, so [L, U] follow from the window sums: deterministic, any content.
  rf-mask   per patch side, a times the count outside the densest window, plus c (a = 1 and c the mean densest
            window of a train split, or both fitted on it: --refill); deterministic as rf-clip.
The receptive-field methods need dmax, a and c from a train split (--calibrate SPLIT, saved as calibration.json) or an
earlier calibration (--calibration FILE). Each side is certified for every pixel the toolkit's patch of that side can
change, under its rotation, scale, bilinear rim and any sub-pixel placement (`--patch-shape`, `--rotation`, `--scale`):
the receptive-field methods at the patch's extent (the side of the smallest axis-aligned square holding all of those
pixels), ablation at its footprint (the side of a square with as many pixels). metrics.json records both.

    python certify.py --model mcnn --weights runs/certify_train/<run>/best.pt \\
        --data ShanghaiTech/part_A_final/test_data
    python certify.py --method rf-mask --weights path/to/mcnn_shtechA_660.h5 \\
        --data ShanghaiTech/part_A_final/test_data --calibrate ShanghaiTech/part_A_final/train_data
    python certify.py --bound-table --d 2150400 --keep 45 --patch-sizes 20 40 81 163
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from datasets.crowd import CrowdDataset
from models import build, releases
from models.receptive_field import receptive_field
from models.weights import read_weights_file
from utils import cli, runs
from utils.ablation import AblationSpec
from utils.certify import AblationCertifier, bound_table, certify_patches, order_statistic_indices
from utils.errors import ToolkitError
from utils.io import save_csv, save_json
from utils.plots import interval_figure, window_figure
from utils.rf_certify import (
    DMAX_QUANTILE,
    REFILLS,
    Calibration,
    RFClipCertifier,
    RFMaskCertifier,
    calibrate,
    extreme_windows,
    load_calibration,
)
from utils.runtime import autocast, batch_for_memory, pick_device, prepare_model

METHODS = ("ablation", "rf-clip", "rf-mask")
# per forward pass where memory is not measured: ablations, or whole images (few: 64 images of 768×1024 through MCNN
# hold over 10 GB of activations, and a bigger batch is no faster on the CPU)
CPU_BATCH = {"ablation": 64, "rf-clip": 4, "rf-mask": 4}


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_model_args(parser, omitted="required (except with --bound-table)")
    group = cli.add_split_args(parser, "certify")
    cli.add_ablation_args(parser, trained=False)
    group = parser.add_argument_group("certificate")
    group.add_argument("--method", default="ablation", choices=METHODS, help="the certified counter")
    group.add_argument("--patch-sizes", type=cli.positive_int, nargs="+", default=[20, 40, 81, 163],
                       help="sides s of the patches to certify against, in pixels")
    cli.add_patch_args(parser, group, placement=False)
    group.add_argument("--samples", type=int, default=1000, help="ablation: ablations per image (N)")
    group.add_argument("--alpha", type=float, default=0.05, help="ablation: 1 − confidence of the certificate")
    group.add_argument("--batch-size", type=cli.positive_int,
                       help="ablation: ablations per forward pass; receptive field: images per forward pass; "
                            "omitted: on CUDA as many as fit in --memory-fraction of the free GPU memory (measured "
                            "with one forward pass at the largest image size), elsewhere "
                            + ", ".join(f"{v} ({k})" for k, v in CPU_BATCH.items()))
    group.add_argument("--memory-fraction", type=cli.unit_interval, default=0.5,
                       help="share of the free GPU memory that an omitted --batch-size fills")
    group.add_argument("--calibrate", type=Path,
                       help="rf-clip / rf-mask: a train split (images/, ground_truth/) to measure dmax and "
                            "rf-mask's a, c on")
    group.add_argument("--calibration", type=Path, help="rf-clip / rf-mask: the calibration.json of an earlier run")
    group.add_argument("--dmax-quantile", type=cli.unit_interval, default=DMAX_QUANTILE,
                       help="rf-clip: dmax is this quantile of the clean output cells of the calibration split")
    group.add_argument("--refill", choices=REFILLS, default=REFILLS[0],
                       help="rf-mask's count per side, a·(count outside the densest window) + c: constant (a = 1, c "
                            "the mean densest-window sum), fitted (a ≥ 0 and c minimising the calibration split's "
                            "summed certified error), or validated: per side the one of the two that, measured on the "
                            "rest of the split, certifies its held-out tenth better (the tenth a training run with "
                            "this --seed and --val 0.1 held out); with --calibration, the file's")
    group.add_argument("--figures", type=cli.non_negative_int, default=4,
                       help="rf-clip / rf-mask: figures of the first N images marking the windows where a patch of "
                            "the largest side hides and adds the most people")
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
        print(f"warning: {weights} was not trained with ablation; the certificate holds but will be loose",
              file=sys.stderr)
    return trained


def _ablation_certifier(args: argparse.Namespace, dataset: CrowdDataset, out_extra: dict,
                        device: torch.device) -> AblationCertifier:
    """The ablation certifier, with the ablation the checkpoint records (or the flags) checked against the images."""
    spec = cli.ablation_spec(args, trained_ablation(args.weights))
    spec.check_fits(dataset.sizes())
    out_extra.update(keep=spec.keep, unit=spec.unit, fill=spec.fill)
    return AblationCertifier(spec, args.samples, args.alpha, generator=torch.Generator(device=device),
                             seed=args.seed)  # its batch size is resolved once the model is on the device


def _calibration_source(args: argparse.Namespace, model, rf) -> Calibration | CrowdDataset:
    """What the receptive-field counters' constants come from, checked before any work: a loaded calibration, or the
    split to calibrate on."""
    found = releases.find(args.weights)
    if args.calibration is None and args.calibrate is None and found is not None:
        args.calibration = releases.calibration(found)  # a release's own, recorded in args.json
    if args.calibration is not None:
        calibration = load_calibration(args.calibration, rf)
        if "refill" in getattr(args, "_given", ()) and args.refill != calibration.refill:
            raise ToolkitError(f"--refill {args.refill} contradicts {args.calibration} (refill {calibration.refill}): "
                               "leave it out to use the file's, or calibrate again with --calibrate")
        args.refill = calibration.refill  # args.json records the refill that runs
        return calibration
    if args.calibrate is not None:
        return CrowdDataset.for_model(cli.check_split(args.calibrate), model, cache=False)  # read once: keep nothing
    raise ToolkitError(f"--method {args.method} needs dmax and c: --calibrate SPLIT (a train split) or "
                       "--calibration FILE (a release's weights bring their own)")


def _batch_size(args: argparse.Namespace, model, dataset: CrowdDataset, device: torch.device) -> int:
    """Ablations (or images) per forward pass: on CUDA as many as fit in --memory-fraction of the free memory at the
    split's largest image size; `CPU_BATCH` elsewhere."""
    h, w = max(dataset.sizes(), key=lambda hw: hw[0] * hw[1])

    def forward(n: int) -> None:
        with autocast(device, args.amp):
            model(torch.rand(n, 3, h, w, device=device))

    most = args.samples if args.method == "ablation" else len(dataset)
    return batch_for_memory(forward, device, args.memory_fraction, CPU_BATCH[args.method], most)


def _window_figures(out: Path, rows: list[dict], dataset: CrowdDataset, model, certifier, side: int, covered: int,
                    shown: int, fmt: str, device: torch.device) -> None:
    """The image and its density, with the windows where a patch of `side` (certified as `covered`) hides (red)
    and adds (blue) the most."""
    for row in rows[:shown]:
        image = dataset[row["index"]][0]
        with torch.no_grad():
            density = model(image[None].to(device)).float().clamp_min(0)[0].cpu()
        boxes = extreme_windows(certifier.rf, side, covered, row, image.shape[-2:])
        count = row.get(f"count{side}", row.get("count"))
        window_figure(out / "figures" / f"{Path(row['image']).stem}.{fmt}", image, density, boxes,
                      f"{row['image']}: {certifier.method} count {count:.1f}, truth {row['gt']:.0f}, patch {side} px")


def main(args: argparse.Namespace) -> dict:
    if not 0 < args.alpha < 1:
        raise ToolkitError(f"--alpha must lie in (0, 1), got {args.alpha}")
    if args.samples < 1:
        raise ToolkitError(f"--samples must be at least 1, got {args.samples}")
    if args.method == "ablation" and not args.bound_table and order_statistic_indices(args.samples, 0.0, args.alpha) \
            is None:
        needed = next(n for n in range(args.samples + 1, 10**6) if order_statistic_indices(n, 0.0, args.alpha))
        print(f"warning: --samples {args.samples} cannot certify any image at --alpha {args.alpha}: even a patch that "
              f"moves nothing (Δ = 0) has no pair of order statistics bounding the median; use --samples {needed} or "
              "more", file=sys.stderr)
    if args.bound_table:
        if args.d is None:
            raise ToolkitError("--bound-table needs --d, the number of units")
        spec = cli.ablation_spec(args, None)
        return {"bound_table": print_bound_table(args.d, spec.keep, args.patch_sizes, spec.unit)}

    if args.weights is None:
        raise ToolkitError("--weights is required: the model to certify (e.g. runs/certify_train/<run>/best.pt)")
    runs.check_out(args, "certify")  # --out first: the calibration (minutes) comes after every check
    device = pick_device(args.device)
    model = build(args.model, args.weights)
    split = cli.synthetic_splits()[1] if args.data is None else cli.check_split(args.data)
    dataset = CrowdDataset.for_model(split, model, max_images=args.max_images)
    # each side is certified for every pixel the toolkit's patch of that side can change (Certifier.covered_side)
    specs = {s: cli.patch_spec(args, s) for s in args.patch_sizes}
    for spec in specs.values():
        spec.check_fits(dataset.smallest_side(), "the smallest image side")
    resolved = {}
    if args.method == "ablation":
        certifier = _ablation_certifier(args, dataset, resolved, device)
    else:
        rf = receptive_field(model)
        source = _calibration_source(args, model, rf)
    model = prepare_model(model, device).eval()
    if args.batch_size is None:
        resolved["batch_size"] = _batch_size(args, model, dataset, device)
    out = cli.run_dir(args, "certify", device, data=split, **resolved)  # every input checked: now the work
    if args.method == "ablation":
        certifier.batch_size = args.batch_size
    else:
        counter = RFClipCertifier if args.method == "rf-clip" else RFMaskCertifier
        calibration = source if isinstance(source, Calibration) else calibrate(
            model, source, rf, sorted({counter.covered_side(spec) for spec in specs.values()}), device,
            args.dmax_quantile, args.amp, refill=args.refill, seed=args.seed)
        for side, choice in calibration.validation.items():
            print(f"refill for {side} px chosen on {len(calibration.held_out)} held-out images: {choice['chosen']} "
                  f"(their tight-MAE: constant {choice['constant']:.2f}, fitted {choice['fitted']:.2f})")
        certifier = counter(rf, calibration)
        calibration.save(out / "calibration.json")

    start = time.perf_counter()
    rows, metrics = certify_patches(certifier, model, dataset, specs, device, args.amp,
                                    args.batch_size if args.method != "ablation" else 1)
    seconds = (time.perf_counter() - start) / len(rows)
    metrics.update(seconds_per_image=seconds, images=len(rows),
                   forward_passes_per_image=args.samples if args.method == "ablation" else 1)
    save_csv(out / "per_image.csv", rows)
    save_json(out / "metrics.json", metrics)
    interval_figure(out / f"intervals.{args.figure_format}", rows, args.patch_sizes)
    if args.method != "ablation" and args.figures > 0:
        largest = max(args.patch_sizes)
        _window_figures(out, rows, dataset, model, certifier, largest, metrics["patch_sizes"][str(largest)][
            "certified_side"], args.figures, args.figure_format, device)
    if metrics["counter"] is not None:
        print(f"{args.method} counts: MAE {metrics['counter']['mae']:.2f}  RMSE {metrics['counter']['rmse']:.2f}")
    for s, m in metrics["patch_sizes"].items():
        print(f"  patch {s:>4}px (certified as {m['certified_side']} px, its {m['side_measure']}): counter MAE "
              f"{m['mae']:.2f}  certified {m['certified_fraction']:.0%}  tight-MAE {m['tight_mae']:.2f} (floor "
              f"{m['floor']:.2f})  tight-RMSE {m['tight_rmse']:.2f}  mean width {m['mean_width']:.2f}")
    print(f"{seconds:.3f} s per image -> {out}")
    return metrics


if __name__ == "__main__":
    cli.run(main, get_args_parser())

"""Count the people in photos and videos, each count with the interval no patch of a given size can push it out of.

One forward pass per image or frame: the receptive-field counter (rf-mask by default) gives its count and, per patch
side, the certified interval [L, U] (see certify.py). Without --weights the SmallField release for ShanghaiTech
Part B (sparse street scenes) counts, with its own calibration.

    python count.py photo.jpg
    python count.py photos/ "more/*.png" --patch-sizes 40 81 --out runs/count/mine --figures
    python count.py street.mp4 --every 10 --out runs/count/street --figures
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from datasets import media
from models import build, releases
from models.receptive_field import receptive_field
from utils import cli, runs
from utils.certify import nominal_rows
from utils.errors import ToolkitError
from utils.io import save_csv, save_json
from utils.plots import count_over_time_figure, window_figure
from utils.rf_certify import RFClipCertifier, RFMaskCertifier, extreme_windows, load_calibration
from utils.runtime import autocast, pick_device, prepare_model, progress

COUNTERS = {"rf-mask": RFMaskCertifier, "rf-clip": RFClipCertifier}


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("paths", nargs="+", help="images, videos, folders of them, or globs (quoted)")
    cli.add_model_args(parser, default="smallfield", omitted=f"the release {releases.DEFAULT}")
    parser.set_defaults(weights=Path(releases.DEFAULT))
    group = parser.add_argument_group("certificate")
    group.add_argument("--method", default="rf-mask", choices=sorted(COUNTERS), help="the certified counter")
    group.add_argument("--patch-sizes", type=cli.positive_int, nargs="+", default=[40, 81],
                       help="sides s of the patches to certify against, in pixels")
    cli.add_patch_args(parser, group, placement=False)
    group.add_argument("--calibration", type=Path,
                       help="the calibration.json of certify.py --calibrate for these weights; omitted: the "
                            "release's own (required for other weights)")
    group = parser.add_argument_group("input and output")
    group.add_argument("--every", type=cli.positive_int, default=1, help="count every N-th frame of a video")
    group.add_argument("--batch-size", type=cli.positive_int, default=4, help="images or frames per forward pass")
    group.add_argument("--figures", action="store_true",
                       help="per image the density and the windows where a patch of the largest side hides and "
                            "adds the most people; per video the count over time with its certified band "
                            "(needs --out, or writes to a new runs/count/<timestamp>)")
    cli.add_run_args(parser, omitted="nothing is written (with --figures: a new runs/count/<timestamp>)")
    return parser


def _calibration_file(args: argparse.Namespace) -> Path:
    if args.calibration is not None:
        return args.calibration
    found = releases.find(args.weights)
    if found is None:
        raise ToolkitError(f"--calibration is needed for {args.weights} (not a release): certify.py --method "
                           f"{args.method} --calibrate <train split> writes one")
    return releases.calibration(found)


def _table(rows: list[dict], sides: list[int], per_side: bool) -> str:
    """The terminal table: one line per image or frame."""
    name = max([len(_label(r)) for r in rows] + [5])
    titles = [f"{s} px: " + ("count [L, U]" if per_side else "[L, U]") for s in sides]
    head = f"{'input':<{name}}  {'count':>8}" + "".join(f"  {t:>30}" for t in titles)
    lines = [head]
    for r in rows:
        cells = [(f"{r[f'count{s}']:.1f} " if per_side else "") + f"[{r[f'L{s}']:.1f}, {r[f'U{s}']:.1f}]"
                 for s in sides]
        lines.append(f"{_label(r):<{name}}  {r['count']:>8.1f}" + "".join(f"  {c:>30}" for c in cells))
    return "\n".join(lines)


def _label(row: dict) -> str:
    return row["source"] if row["frame"] is None else f"{row['source']} #{row['frame']}"


def main(args: argparse.Namespace) -> dict:
    found = media.sources(args.paths)  # every input checked before any work
    if args.out is not None or args.figures:
        runs.check_out(args, "count")
    device = pick_device(args.device)
    model = build(args.model, args.weights)
    rf = receptive_field(model)
    calibration_file = _calibration_file(args)
    certifier = COUNTERS[args.method](rf, load_calibration(calibration_file, rf))
    cover = {s: certifier.covered_side(cli.patch_spec(args, s)) for s in args.patch_sizes}
    if args.method == "rf-mask":
        missing = sorted(c for c in set(cover.values()) if c not in certifier.calibration.c)
        if missing:
            raise ToolkitError(f"{calibration_file} holds no rf-mask constant for the certified sides {missing} "
                               f"(it has {sorted(certifier.calibration.c)}): choose other --patch-sizes or calibrate "
                               "again with certify.py")
    out = None
    if args.out is not None or args.figures:
        out = cli.run_dir(args, "count", device, calibration=str(calibration_file))
    model = prepare_model(model, device).eval()

    rows = []
    batches = media.prefetched(media.batches(found, model.size_multiple, args.batch_size, args.every,
                                             grey=model.native_channels == 1))
    bar = progress(None, "count", total=media.frame_total(found, args.every))
    with torch.no_grad():
        for labels, images in batches:
            with autocast(device, args.amp):
                certified = certifier.certify_batch(model, images.to(device), sorted(set(cover.values())))
            for (source, frame), image, row in zip(labels, images, nominal_rows(certified, cover), strict=True):
                row = {"source": str(source.path), "frame": frame, "height": image.shape[-2],
                       "width": image.shape[-1], "count": row.pop("total", None), **row}  # rf-clip: its own count
                rows.append(row)
                if out is not None and args.figures and not source.video:
                    _window_figure(out, row, image, model, certifier, max(args.patch_sizes), cover, device,
                                   args.figure_format)
            bar.update(len(labels))
    bar.close()

    sides, per_side = args.patch_sizes, args.method == "rf-mask"
    print(_table(rows, sides, per_side))
    result = {"weights": str(args.weights), "model": args.model, "calibration": str(calibration_file),
              **certifier.settings(), "patch_sizes": {str(s): {"certified_side": c} for s, c in cover.items()},
              "rows": rows}
    if out is not None:
        columns = ["source", "frame", "height", "width", "count"] + [
            f"{k}{s}" for s in sides for k in (("count", "L", "U") if per_side else ("L", "U"))]
        save_csv(out / "counts.csv", [{k: r[k] for k in columns} for r in rows])
        save_json(out / "counts.json", result)
        if args.figures:
            for source in (s for s in found if s.video):
                video_rows = [r for r in rows if r["source"] == str(source.path)]
                count_over_time_figure(out / "figures" / f"{source.path.stem}.{args.figure_format}", video_rows,
                                       sides, per_side, source.path.name)
        print(f"-> {out}", file=sys.stderr)
    return result


def _window_figure(out: Path, row: dict, image: torch.Tensor, model, certifier, side: int, cover: dict[int, int],
                   device: torch.device, fmt: str) -> None:
    """The image and its density, with the windows where a patch of `side` hides and adds the most people."""
    density = model(image[None].to(device)).float().clamp_min(0)[0].cpu()
    boxes = extreme_windows(certifier.rf, side, cover[side], row, image.shape[-2:])
    count = row.get(f"count{side}", row["count"])
    window_figure(out / "figures" / f"{Path(row['source']).stem}.{fmt}", image, density, boxes,
                  f"{Path(row['source']).name}: {certifier.method} count {count:.1f}, certified "
                  f"[{row[f'L{side}']:.1f}, {row[f'U{side}']:.1f}] against any {side} px patch")


if __name__ == "__main__":
    cli.run(main, get_args_parser())

"""Plot the certified trade-off of several `certify.py` runs of one test split: for each run (a model and a method)
and patch side, the certified counter's clean MAE against its tight-MAE (the worst case any patch of that side can
force), with the floor of each side (the mean most heads under any s×s square: what a patch can hide from an exact
counter).

    python tradeoff.py runs/certify/mcnn_B runs/certify/smallfield_B --out tradeoff.png
    python tradeoff.py A B --labels "MCNN (real B weights)" "SmallField" --sides 20 40 81 --out tradeoff.pdf
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from utils import cli, runs
from utils.errors import ToolkitError
from utils.io import load_json
from utils.plots import tradeoff_figure


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    group = parser.add_argument_group("input")
    group.add_argument("runs", type=Path, nargs="+", help="certify.py run folders (each with metrics.json)")
    group.add_argument("--labels", nargs="+", help="one legend label per run; omitted: <folder> (<model>, <method>)")
    group.add_argument("--sides", type=int, nargs="+", help="patch sides to plot; omitted: every side certified")
    group = parser.add_argument_group("output")
    group.add_argument("--out", type=Path, required=True, help="figure file to write: .png, .pdf or .svg")
    group.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def run_points(folder: Path, sides: list[int] | None) -> tuple[str, dict[int, tuple[float, float, float]]]:
    """A certify run's default label and, per side, (clean MAE of its certified counter, tight-MAE or NaN where no
    image is certified, share of the images certified)."""
    record, metrics = runs.read_record(folder), load_json(folder / "metrics.json")
    if "patch_sizes" not in metrics:
        raise ToolkitError(f"{folder} is not a certify.py run (its metrics.json has no patch_sizes)")
    points = {}
    for side, m in metrics["patch_sizes"].items():
        if sides is not None and int(side) not in sides:
            continue
        clean = m["mae"] if "mae" in m else (metrics["counter"] or {}).get("mae")  # rf-mask: a counter per side
        tight = m.get("tight_mae")  # null (NaN in older files): no image certified at this side
        tight = math.nan if tight is None or tight != tight else float(tight)
        if clean is not None:
            points[int(side)] = (float(clean), tight, float(m.get("certified_fraction", tight == tight)))
    if not points:
        raise ToolkitError(f"{folder} has no side among {sides or 'its sides'}")
    return f"{folder.name} ({record.get('model', '?')}, {metrics['method']})", points


def run_floors(folder: Path, sides: list[int] | None) -> dict[int, float]:
    """Per side, the floor a certify run recorded (the mean most heads under any s×s square of its test split)."""
    metrics = load_json(folder / "metrics.json")
    return {int(s): float(m["floor"]) for s, m in metrics["patch_sizes"].items()
            if m.get("floor") is not None and (sides is None or int(s) in sides)}


def main(args: argparse.Namespace) -> Path:
    runs.claim_file(args.out, (".png", ".pdf", ".svg"), args.overwrite)
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise ToolkitError(f"--labels gives {len(args.labels)} labels for {len(args.runs)} runs")
    points, floors = {}, {}
    for k, folder in enumerate(args.runs):
        label, per_side = run_points(folder, args.sides)
        for side, floor in run_floors(folder, args.sides).items():
            if abs(floors.setdefault(side, floor) - floor) > 1e-6:
                raise ToolkitError(f"{folder} has another floor at {side} px ({floor:.2f}, not {floors[side]:.2f}): "
                                   "the runs certify different test splits; plot each split on its own")
        label = args.labels[k] if args.labels else label
        if label in points:
            raise ToolkitError(f"two runs are labelled {label!r}; give --labels")
        points[label] = per_side
        print(f"{folder}: " + ", ".join(f"{s} px clean {c:.2f} tight {t:.2f} ({f:.0%} certified)"
                                        for s, (c, t, f) in per_side.items()))
    path = tradeoff_figure(args.out, points, floors)
    print(f"-> {path}")
    return path


if __name__ == "__main__":
    cli.run(main, get_args_parser())

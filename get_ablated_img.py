"""Write the randomly ablated version of one image, as a certified model sees it: `--keep` units chosen uniformly
without replacement keep their value, the rest are set to the fill.

    python get_ablated_img.py IMG_26.jpg --keep 5000 --out ablated.png
    python get_ablated_img.py IMG_26.jpg --keep 45000 --unit pixel --panel --out panel.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets.shanghaitech import load_image
from utils import cli, runs
from utils.ablation import FILL, UNITS, ablate
from utils.io import atomic_write
from utils.plots import image_panels


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    group = parser.add_argument_group("input")
    group.add_argument("image", type=Path, help="the image file to ablate (e.g. a ShanghaiTech .jpg)")
    group = parser.add_argument_group("ablation")
    group.add_argument("--keep", type=cli.positive_int, default=5000, help="units kept (k) of the whole image")
    group.add_argument("--unit", default="element", choices=UNITS,
                       help="element: one of the 3·H·W values (one channel of a pixel); pixel: one pixel with its "
                            "3 channels")
    group.add_argument("--fill", type=cli.unit_interval, default=FILL,
                       help="value of the ablated units, in [0, 1] pixel units")
    group.add_argument("--seed", type=int, default=0, help="seed of the random choice of kept units")
    group = parser.add_argument_group("output")
    group.add_argument("--out", type=Path, required=True,
                       help="file to write (required): .png; with --panel also .pdf or .svg")
    group.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    group.add_argument("--panel", action="store_true",
                       help="write the original, the ablated image and a jet-coloured view side by side")
    return parser


def main(args: argparse.Namespace) -> Path:
    runs.claim_file(args.out, (".png", ".pdf", ".svg") if args.panel else (".png",), args.overwrite)
    image = load_image(args.image)
    ablated = ablate(image[None], args.keep, args.unit, args.fill, torch.Generator().manual_seed(args.seed))[0]
    if args.panel:
        path = image_panels(args.out, [("original", image), (f"ablated, k = {args.keep} {args.unit}s", ablated),
                                       ("ablated (jet)", ablated.mean(0))])
    else:
        pixels = (ablated.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = atomic_write(args.out, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
    print(f"kept {args.keep} of the {args.unit}s of {args.image} -> {path}")
    return path


if __name__ == "__main__":
    cli.run(main, get_args_parser())

"""Write the randomly ablated version of one image (DESIGN §6): `keep` units kept, the rest set to the fill.

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
from utils import cli
from utils.ablation import FILL, UNITS, ablate
from utils.io import atomic_write
from utils.plots import image_panels


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("image", type=Path)
    parser.add_argument("--keep", type=cli.positive_int, default=5000, help="units kept (k)")
    parser.add_argument("--unit", default="element", choices=UNITS, help="a value of one channel, or a pixel")
    parser.add_argument("--fill", type=float, default=FILL, help="value of the ablated units, in [0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--panel", action="store_true", help="original, ablated and a jet view side by side")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    return parser


def main(args: argparse.Namespace) -> Path:
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

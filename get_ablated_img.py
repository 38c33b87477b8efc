"""Write the randomly ablated version of one image, as a certified model sees it: `--keep` units chosen uniformly
without replacement keep their value, the rest are set to the fill.

    python get_ablated_img.py IMG_26.jpg --keep 5000 --out ablated.png
    python get_ablated_img.py IMG_26.jpg --keep 45000 --unit pixel --panel --out panel.png
    python get_ablated_img.py IMG_26.jpg --checkpoint runs/certify_train/<run>/best.pt --out seen.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets.shanghaitech import load_image
from utils import cli, runs
from utils.ablation import AblationSpec
from utils.errors import ToolkitError
from utils.io import atomic_write, load_checkpoint
from utils.plots import image_panels

KEEP_SHOWN = 5000  # without a checkpoint: enough kept elements to see the image through the fill


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    group = parser.add_argument_group("input")
    group.add_argument("image", type=Path, help="the image file to ablate (e.g. a ShanghaiTech .jpg)")
    group.add_argument("--checkpoint", type=Path,
                       help="an ablation-trained checkpoint (MCNN_certify_train.py): ablate as it was trained")
    group = cli.add_ablation_args(parser, trained=False, keep=KEEP_SHOWN)
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
    trained = None
    if args.checkpoint is not None:
        trained = AblationSpec.from_checkpoint(load_checkpoint(args.checkpoint))
        if trained is None:
            raise ToolkitError(f"{args.checkpoint} records no ablation (not from MCNN_certify_train.py)")
    spec = cli.ablation_spec(args, trained, KEEP_SHOWN)
    image = load_image(args.image)
    spec.check_fits([tuple(image.shape[-2:])])
    ablated = spec.ablate(image[None], torch.Generator().manual_seed(args.seed))[0]
    if args.panel:
        path = image_panels(args.out, [("original", image), (f"ablated, k = {spec.keep} {spec.unit}s", ablated),
                                       ("ablated (jet)", ablated.mean(0))])
    else:
        pixels = (ablated.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = atomic_write(args.out, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
    print(f"kept {spec.keep} of the {spec.unit}s of {args.image}, the rest set to {spec.fill} -> {path}")
    return path


if __name__ == "__main__":
    cli.run(main, get_args_parser())

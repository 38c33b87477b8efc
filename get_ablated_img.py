"""Write the randomly ablated version of one image, as a certified model sees it: `--keep` units chosen uniformly
without replacement keep their value, the rest are set to the fill.

    python get_ablated_img.py IMG_26.jpg --keep 5000 --out ablated.png
    python get_ablated_img.py IMG_26.jpg --keep 45000 --unit pixel --panel --out panel.png
    python get_ablated_img.py IMG_26.jpg --checkpoint runs/certify_train/<run>/best.pt --out seen.png
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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


FIGURE_PIXELS = 520  # the width a panel is drawn at, in figure pixels


def visible_dot(width: int, dot: int = 4) -> int:
    """The odd side, in image pixels, that makes one pixel of an image `width` wide about `dot` figure pixels."""
    side = max(1, math.ceil(dot * width / FIGURE_PIXELS))
    return side + (side % 2 == 0)


def kept_units_view(spec: AblationSpec, shape: torch.Size, seed: int, ablated: torch.Tensor, grow: int
                    ) -> torch.Tensor:
    """(H, W): the brightness of the pixels that keep a unit of the ablation drawn by `seed` (NaN elsewhere), each
    grown to a `grow`-pixel square so that a handful among millions shows at a figure's size."""
    marked = spec.ablate(torch.full((1, *shape), math.nan), torch.Generator().manual_seed(seed))[0]
    kept = marked.isnan()  # the same draw as the image's: kept units carry the NaN through
    brightness = torch.where(kept, ablated, 0.0).sum(0) / kept.sum(0).clamp_min(1)
    values = torch.where(kept.any(0), brightness, -math.inf)[None, None]
    grown = F.max_pool2d(values, grow, stride=1, padding=grow // 2)[0, 0]
    return torch.where(grown.isinf(), math.nan, grown)


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
        grow = visible_dot(image.shape[-1])
        kept = kept_units_view(spec, image.shape, args.seed, ablated, grow)
        path = image_panels(args.out, [
            ("original", image), (f"ablated: k = {spec.keep} {spec.unit}s kept, the rest {spec.fill:g}", ablated),
            (f"the kept {spec.unit}s alone, each drawn {grow}×{grow} px to be seen", kept,
             "brightness (mean of the kept channels)")], f"randomized ablation of {Path(args.image).name}")
    else:
        pixels = (ablated.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = atomic_write(args.out, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
    print(f"kept {spec.keep} of the {spec.unit}s of {args.image}, the rest set to {spec.fill} -> {path}")
    return path


if __name__ == "__main__":
    cli.run(main, get_args_parser())

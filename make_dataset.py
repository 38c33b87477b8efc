"""Prepare data: CSRNet-style `.h5` density maps for ShanghaiTech-layout splits, or a synthetic crowd set.

    python make_dataset.py densities ShanghaiTech/part_A_final --kernel adaptive   # writes ground_truth/IMG_<i>.h5
    python make_dataset.py synthetic --out data/synthetic --n-train 120 --n-test 40
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import h5py
from tqdm import tqdm

from datasets.density import density_map
from datasets.shanghaitech import ground_truth_file, list_images, load_image, read_points
from datasets.synthetic import write_synthetic
from utils import cli
from utils.errors import ToolkitError
from utils.io import atomic_write


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="{densities,synthetic}",
                                help="run `make_dataset.py COMMAND --help` for its flags")
    what = "write <split>/ground_truth/IMG_<i>.h5 density maps (HDF5 dataset 'density') from the head points"
    den = sub.add_parser("densities", help=what, formatter_class=cli.HelpFormatter,
                         description=f"{what[0].upper()}{what[1:]},\nas the scripts read them with --density h5.")
    group = den.add_argument_group("input")
    group.add_argument("root", type=Path,
                       help="ONE split folder holding images/ and ground_truth/ (e.g. "
                            "ShanghaiTech/part_A_final/test_data), or a dataset root holding such splits "
                            "(e.g. ShanghaiTech/part_A_final)")
    group = den.add_argument_group("density")
    group.add_argument("--kernel", default="adaptive", choices=("adaptive", "fixed"),
                       help="Gaussian per head: geometry-adaptive (σ = 0.3 × mean distance to the 3 nearest heads) "
                            "or MCNN's fixed σ = 4 on a 15×15 window")
    what = "render a synthetic crowd set in ShanghaiTech layout (train_data/ and test_data/, .mat ground truth)"
    syn = sub.add_parser("synthetic", help=what, formatter_class=cli.HelpFormatter,
                         description=f"{what[0].upper()}{what[1:]}.\nThe scripts generate and cache one themselves "
                                     "when given no data; this writes one where you choose.")
    group = syn.add_argument_group("output")
    group.add_argument("--out", type=Path, required=True,
                       help="new (or empty) folder to write the set to, e.g. data/synthetic (required)")
    group = syn.add_argument_group("synthetic set")
    group.add_argument("--n-train", type=cli.positive_int, default=120, help="images in train_data/")
    group.add_argument("--n-test", type=cli.positive_int, default=40, help="images in test_data/")
    group.add_argument("--height", type=cli.positive_int, default=240, help="image height, in pixels")
    group.add_argument("--width", type=cli.positive_int, default=320, help="image width, in pixels")
    group.add_argument("--max-count", type=cli.positive_int, default=300,
                       help="most people in one image (counts spread over 0 to this)")
    group.add_argument("--seed", type=int, default=0, help="seed of the scenes drawn")
    return parser


def _splits(root: Path) -> list[Path]:
    if (root / "images").is_dir():
        return [root]
    splits = sorted(p for p in root.iterdir() if (p / "images").is_dir()) if root.is_dir() else []
    if not splits:
        raise ToolkitError(f"{root} is neither a split (images/, ground_truth/) nor a folder of splits")
    return splits


def _inputs(root: Path) -> dict[Path, list[tuple[Path, Path]]]:
    """Per split, every (image, .mat ground truth), checked before any density is computed: each image has its
    ground truth, and each ground_truth/ folder is writable."""
    inputs = {}
    for split in _splits(root):
        pairs = []
        for image_path in list_images(split):
            mat = ground_truth_file(image_path, ".mat")
            if mat is None:
                raise ToolkitError(f"no ground truth for {image_path}")
            if not os.access(mat.parent, os.W_OK | os.X_OK):
                raise ToolkitError(f"cannot write the density maps: {mat.parent} is not writable")
            pairs.append((image_path, mat))
        inputs[split] = pairs
    return inputs


def write_densities(root: Path, kernel: str) -> int:
    written = 0
    for split, pairs in _inputs(root).items():
        for image_path, mat in tqdm(pairs, desc=split.name, dynamic_ncols=True):
            h, w = load_image(image_path).shape[-2:]
            density = density_map(read_points(mat, h, w), (h, w), kernel)

            def write(tmp: Path, density=density) -> None:
                with h5py.File(tmp, "w") as f:
                    f.create_dataset("density", data=density, compression="gzip")

            atomic_write(mat.parent / f"{image_path.stem}.h5", write)
            written += 1
    return written


def main(args: argparse.Namespace) -> None:
    if args.command == "densities":
        print(f"wrote {write_densities(args.root, args.kernel)} density maps ({args.kernel}) under {args.root}")
    else:
        root = write_synthetic(args.out, n_train=args.n_train, n_test=args.n_test, height=args.height,
                               width=args.width, max_count=args.max_count, seed=args.seed)
        print(f"wrote a synthetic crowd set to {root}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())

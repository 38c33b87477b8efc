"""ShanghaiTech-layout splits: `<split>/images/IMG_<i>.jpg` with `ground_truth/GT_IMG_<i>.mat` (or `IMG_<i>.h5`)."""
from __future__ import annotations

import io
import re
from pathlib import Path

import h5py
import numpy as np
import scipy.io
import torch
from PIL import Image, UnidentifiedImageError

from utils.errors import ToolkitError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
GT_DIRS = ("ground_truth", "ground-truth")  # some redistributions use a hyphen
_MAT_HEADER = b"MATLAB 5.0 MAT-file, crowd-robustness toolkit".ljust(116)  # no timestamp: same bytes each time


def natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def list_images(split: str | Path) -> list[Path]:
    """Image files of a split folder, in natural order (IMG_2 before IMG_10)."""
    split = Path(split)
    folder = split / "images"
    if not folder.is_dir():
        raise ToolkitError(f"{split} is not a ShanghaiTech-layout split: no images/ folder")
    images = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
    if not images:
        raise ToolkitError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def ground_truth_file(image: Path, suffix: str) -> Path | None:
    """The annotation next to an image: `GT_<stem>.mat` for points, `<stem>.h5` for a CSRNet density."""
    name = f"GT_{image.stem}.mat" if suffix == ".mat" else f"{image.stem}{suffix}"
    for gt_dir in GT_DIRS:
        path = image.parent.parent / gt_dir / name
        if path.is_file():
            return path
    return None


def load_image(path: str | Path, grey: bool = False) -> torch.Tensor:
    """An image as a float (3, H, W) tensor in [0, 1], RGB; grey images are expanded to three channels.

    `grey=True` reads the luma the grey models were trained on: for a JPEG, the decoder's own Y plane (as OpenCV's
    grey decoding), which the luma of the decoded, clipped RGB misses by up to a grey level. The three equal
    channels have exactly that luma, so MCNN, CMTL and DA-Net see what their original pipelines fed them.
    """
    try:
        with Image.open(path) as img:
            if grey:
                img.draft("L", img.size)  # JPEG: take the Y plane as decoded, no colour round trip
            pixels = np.asarray(img.convert("L" if grey else "RGB"))
    except FileNotFoundError:
        raise ToolkitError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ToolkitError(f"cannot read image {path}: {e}") from None
    return pixels_to_tensor(pixels, grey)


def pixels_to_tensor(pixels: np.ndarray, grey: bool = False) -> torch.Tensor:
    """uint8 pixels, (H, W, 3) RGB or (H, W) luma with `grey`, as a float (3, H, W) tensor in [0, 1] (luma in all
    three channels)."""
    image = torch.from_numpy(np.array(pixels)).float().div_(255)  # a copy: decoders hand out read-only arrays
    return image.expand(3, *image.shape).contiguous() if grey else image.permute(2, 0, 1)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        raise ToolkitError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ToolkitError(f"cannot read image {path}: {e}") from None
    return height, width


def read_points(path: str | Path, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Head points (N, 2) as (x, y) from a ShanghaiTech `.mat`; points outside the image are dropped."""
    try:
        mat = scipy.io.loadmat(path)
        points = np.asarray(mat["image_info"][0, 0][0, 0][0], dtype=np.float64)
    except FileNotFoundError:
        raise ToolkitError(f"annotation not found: {path}") from None
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ToolkitError(f"{path} holds no head points (expected image_info{{1}}.location): {e}") from None
    except Exception as e:  # scipy raises several private types for corrupt files
        raise ToolkitError(f"cannot read annotation {path}: {e}") from None
    if points.size == 0:
        return np.zeros((0, 2))
    if points.ndim != 2 or points.shape[1] != 2:
        raise ToolkitError(f"{path}: head points have shape {points.shape}, expected (N, 2)")
    if height is not None and width is not None:
        x, y = points[:, 0], points[:, 1]
        points = points[(x >= 0) & (x < width) & (y >= 0) & (y < height)]
    return points


def write_points(path: str | Path, points: np.ndarray) -> None:
    """Write head points as ShanghaiTech does: image_info = 1×1 cell of a 1×1 struct (location (N, 2), number)."""
    info = np.empty((1, 1), dtype=[("location", object), ("number", object)])
    info[0, 0] = (np.asarray(points, np.float64).reshape(-1, 2), np.array([[len(points)]], np.uint32))
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = info
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"image_info": cell})
    Path(path).write_bytes(_MAT_HEADER + buf.getvalue()[len(_MAT_HEADER):])


def read_h5_density(path: str | Path) -> np.ndarray:
    """A CSRNet-style full-resolution density (`density` dataset) as float32 (H, W)."""
    try:
        with h5py.File(path, "r") as f:
            return np.asarray(f["density"], dtype=np.float32)
    except (OSError, KeyError) as e:
        raise ToolkitError(f"cannot read density {path}: {e}") from None

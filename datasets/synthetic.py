"""Synthetic crowd scenes with known head points, written in ShanghaiTech layout: the embedded default data.

A scene is a ground plane seen in perspective: people are head-and-shoulder shapes whose size grows linearly
with the image row, drawn far to near so that nearer people occlude farther ones, on textured backgrounds with
distractor shapes that are not people. The head point is the centre of the head ellipse.
"""
import inspect
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from datasets.shanghaitech import write_points
from utils.errors import ToolkitError
from utils.runtime import cache_dir

VERSION = 1  # bump whenever the rendering changes, so cached sets of the old look are not reused
MANIFEST = "synthetic.json"
_REF_HEIGHT = 240  # head radii and blur below are tuned at this image height and scale with it
_SPLITS = ("train_data", "test_data")

log = logging.getLogger(__name__)

# RGB palettes; every colour is jittered per person
_SKIN = np.array([(255, 224, 196), (241, 194, 155), (224, 172, 105), (198, 134, 66), (161, 102, 60),
                  (141, 85, 36), (95, 60, 35)], np.float64)
_HAIR = np.array([(20, 15, 12), (40, 28, 20), (70, 45, 30), (110, 75, 45), (190, 160, 100), (150, 150, 145),
                  (35, 35, 40)], np.float64)


@dataclass(frozen=True)
class _Perspective:
    """Head radius grows linearly with the row from the horizon row `y_v` (above the image or in it)."""

    height: int
    y_top: float  # first row where heads stand; above it is sky, wall or foliage
    y_v: float
    r_near: float  # head radius at the bottom row

    def radius(self, y: np.ndarray) -> np.ndarray:
        # clamped so rows at or above the horizon (always covered by the upper region) stay finite
        return np.maximum(self.r_near * (y - self.y_v) / (self.height - self.y_v), 0.3)


def _perspective(rng: np.random.Generator, height: int) -> _Perspective:
    f = height / _REF_HEIGHT
    y_top = rng.uniform(0.0, 0.35) * height
    r_near, r_far = rng.uniform(7.0, 10.0) * f, max(rng.uniform(1.6, 2.8) * f, 0.8)
    q = r_far / r_near  # radius(y_top) == r_far
    return _Perspective(height, y_top, (y_top - q * height) / (1.0 - q), r_near)


def _colours(rng: np.random.Generator, n: int, sat: tuple[float, float],
             val: tuple[float, float]) -> np.ndarray:
    """n random RGB colours (float, 0-255) from uniform hue and the given HSV saturation/value ranges."""
    hsv = np.stack([rng.uniform(0, 180, n), rng.uniform(*sat, n) * 255, rng.uniform(*val, n) * 255], -1)
    hsv = hsv.astype(np.uint8).reshape(1, n, 3)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0].astype(np.float64) if n else np.zeros((0, 3))


def _value_noise(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, cell: float) -> np.ndarray:
    """Smooth noise in [0, 1] sampled at coordinates (u, v), one random value per `cell` units, tiling."""
    grid = rng.random((32, 32), dtype=np.float32)
    map_u, map_v = (np.mod(u / cell, 32).astype(np.float32), np.mod(v / cell, 32).astype(np.float32))
    return cv2.remap(grid, map_u, map_v, cv2.INTER_CUBIC, borderMode=cv2.BORDER_WRAP).clip(0, 1)


def _mix(mask: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    return c0 + mask[..., None] * (c1 - c0)


def _ground(rng: np.random.Generator, geo: _Perspective, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    # ground-plane coordinates in head radii: textures drawn in them shrink toward the horizon
    r = geo.radius(yy)
    gx, gz = (xx - xx.shape[1] / 2) / r, (geo.height - geo.y_v) / r
    c0, c1 = _colours(rng, 2, (0.0, 0.5), (0.25, 0.85))
    kind, period = rng.integers(3), rng.uniform(4.0, 14.0)
    if kind == 0:  # tiles with grout lines
        u, v = gx / period, gz / period
        parity = (np.floor(u) + np.floor(v)) % 2
        grout = (np.minimum(np.abs(u - np.round(u)), np.abs(v - np.round(v))) < 0.05).astype(np.float32)
        img = _mix(parity * rng.uniform(0.1, 0.6), c0, c1) * (1 - 0.35 * grout[..., None])
    elif kind == 1:  # stripes (crossings, boards, lanes)
        theta = rng.uniform(0, np.pi)
        img = _mix((np.sin(2 * np.pi * (gx * np.cos(theta) + gz * np.sin(theta)) / period) > 0) * 0.5, c0, c1)
    else:  # plain surface
        img = np.broadcast_to(c0, xx.shape + (3,)).astype(np.float64)
    stains = _value_noise(rng, gx, gz, rng.uniform(3.0, 20.0)) - 0.5
    return img * (1 + rng.uniform(0.1, 0.5) * stains[..., None])


def _upper(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """What lies behind the crowd: sky, a facade with windows, or foliage."""
    h, w = xx.shape
    kind = rng.integers(3)
    if kind == 0:  # sky with clouds
        top, bottom = _colours(rng, 2, (0.0, 0.5), (0.6, 1.0))
        clouds = _value_noise(rng, xx, yy * 2, rng.uniform(8.0, 30.0) * h / _REF_HEIGHT)
        return _mix(yy / h, top, bottom) + 60 * (clouds[..., None] - 0.5)
    if kind == 1:  # facade: a grid of windows
        wall, window = _colours(rng, 2, (0.0, 0.6), (0.2, 0.9))
        pw, ph = rng.uniform(0.05, 0.2, 2) * w
        fx, fy = np.mod(xx / pw + rng.random(), 1), np.mod(yy / ph + rng.random(), 1)
        fill = rng.uniform(0.3, 0.8, 2)
        return _mix(((fx < fill[0]) & (fy < fill[1])).astype(np.float32), wall, window)
    leaves = _colours(rng, 2, (0.3, 0.8), (0.1, 0.6))
    f = h / _REF_HEIGHT
    n = _value_noise(rng, xx, yy, 6.0 * f) + 0.5 * _value_noise(rng, xx, yy, 2.0 * f)
    return _mix((n / 1.5) ** 1.5, *leaves)


def _background(rng: np.random.Generator, geo: _Perspective, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    y_split = geo.y_top - rng.uniform(0.0, 0.08) * height  # the crowd's top edge stands just over the ground
    ground = np.clip((yy - y_split) / (0.02 * height + 1), 0, 1)
    img = _mix(ground, _upper(rng, xx, yy), _ground(rng, geo, xx, yy))
    grain = rng.normal(0, rng.uniform(2, 12), (height, width, 1))  # pixel texture: asphalt, fabric, foliage
    return np.clip(img + grain, 0, 255).astype(np.uint8)


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x * 16)), int(round(y * 16))  # OpenCV sub-pixel coordinates at shift=4


def _ellipse(img: np.ndarray, x: float, y: float, ax: float, ay: float, colour, angle: float = 0.0,
             start: float = 0.0, end: float = 360.0) -> None:
    cv2.ellipse(img, _pt(x, y), _pt(max(ax, 0.5), max(ay, 0.5)), angle, start, end, tuple(map(float, colour)),
                -1, cv2.LINE_AA, 4)


def _draw_distractors(rng: np.random.Generator, img: np.ndarray, geo: _Perspective) -> None:
    """Blobs, boxes and poles at the scene's scale that are not people (some in skin and hair tones)."""
    h, w = img.shape[:2]
    n = rng.poisson(rng.uniform(3, 15) * h * w / (_REF_HEIGHT * 320))
    xs, ys = rng.uniform(0, w, n), rng.uniform(geo.y_top - 0.1 * h, h, n)
    rs = geo.radius(ys)
    colours = _colours(rng, n, (0.0, 1.0), (0.05, 1.0))
    tones = np.concatenate([_SKIN, _HAIR])[rng.integers(len(_SKIN) + len(_HAIR), size=n)]
    colours = np.where(rng.random((n, 1)) < 0.3, tones, colours)  # hard negatives: a head's colour, no body
    for x, y, r, c, kind, (a, b), angle in zip(xs, ys, rs, colours, rng.integers(3, size=n),
                                               rng.uniform(0.5, 3.0, (n, 2)), rng.uniform(0, 180, n),
                                               strict=True):
        if kind == 0:  # round or elongated blob
            _ellipse(img, x, y, a * r, b * r, c, angle)
        elif kind == 1:  # box or sign
            box = cv2.boxPoints(((x, y), (3 * a * r, 2 * b * r), angle / 8))
            cv2.fillPoly(img, [np.round(box * 16).astype(np.int32)], tuple(map(float, c)), cv2.LINE_AA, 4)
        else:  # pole or railing post
            cv2.line(img, _pt(x, y), _pt(x, y - 4 * b * r), tuple(map(float, c)), max(int(a * r / 3), 1),
                     cv2.LINE_AA, 4)


def _place_people(rng: np.random.Generator, geo: _Perspective, width: int, count: int):
    """Head points (count, 2) sorted far to near, and their radii: uniform on the ground plus clusters."""
    h = geo.height
    rows = np.arange(int(geo.y_top), h) + 0.5
    pdf = geo.radius(rows) ** -2.0  # a uniform crowd on the ground has more heads per pixel far away
    pdf /= pdf.sum()
    m = 2 * count + 16  # candidates: thinned below so no head centre hides inside a nearer head

    def base(k: int) -> np.ndarray:
        return np.stack([rng.uniform(0, width, k), rng.choice(rows, k, p=pdf) - 0.5 + rng.random(k)], -1)

    pts = base(m)
    clustered = rng.random(m) < rng.uniform(0.0, 0.7)
    centres = base(rng.integers(1, 5))
    which = rng.integers(len(centres), size=m)
    spread = geo.radius(centres[which, 1:]) * rng.uniform(4.0, 15.0, (len(centres), 1))[which]
    pts = np.where(clustered[:, None], centres[which] + rng.normal(size=(m, 2)) * spread, pts)
    outside = (pts[:, 0] < 0) | (pts[:, 0] >= width) | (pts[:, 1] < geo.y_top) | (pts[:, 1] >= h)
    pts[outside] = base(int(outside.sum()))
    radii = geo.radius(pts[:, 1]) * rng.uniform(0.85, 1.15, m)
    # Matern hard-core thinning: drop a candidate whose centre lies in an earlier one's head; if too few
    # survive (very dense scenes), the dropped ones fill up the count so it is always exact
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    hidden = np.tril(dist < 0.9 * np.maximum(radii[:, None], radii[None]), -1).any(1)
    keep = np.concatenate([np.flatnonzero(~hidden), np.flatnonzero(hidden)])[:count]
    keep = keep[np.argsort(pts[keep, 1], kind="stable")]
    return pts[keep], radii[keep]


def _draw_people(rng: np.random.Generator, img: np.ndarray, pts: np.ndarray, radii: np.ndarray) -> None:
    """Head-and-shoulder figures, in the given (far to near) order so nearer ones occlude farther ones."""
    n = len(pts)
    skin = np.clip(_SKIN[rng.integers(len(_SKIN), size=n)] + rng.normal(0, 8, (n, 3)), 0, 255)
    hair = np.clip(_HAIR[rng.integers(len(_HAIR), size=n)] + rng.normal(0, 8, (n, 3)), 0, 255)
    neutral = rng.random((n, 1)) < 0.35  # many wear black, grey or white
    cloth = np.where(neutral, _colours(rng, n, (0.0, 0.15), (0.05, 0.8)),
                     _colours(rng, n, (0.2, 0.75), (0.15, 0.85)))
    hat = _colours(rng, n, (0.2, 1.0), (0.2, 1.0))
    style = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])  # 0 facing the camera, 1 seen from behind, 2 with a hat
    build = rng.uniform(0.85, 1.2, n)  # shoulder width
    tilt = rng.normal(0, 8, n)
    for (x, y), r, s, hr, c, ht, kind, b, t in zip(pts, radii, skin, hair, cloth, hat, style, build, tilt,
                                                   strict=True):
        _ellipse(img, x, y + 5.0 * r, 2.0 * b * r, 3.2 * r, 0.75 * c)  # torso, mostly hidden in dense crowds
        _ellipse(img, x, y + 2.5 * r, 2.3 * b * r, 1.45 * r, 0.55 * c)  # dark rim parts overlapping people
        _ellipse(img, x, y + 2.5 * r, 2.15 * b * r, 1.3 * r, c)  # shoulders
        _ellipse(img, x, y + 1.1 * r, 0.45 * r, 0.6 * r, 0.8 * s)  # neck
        _ellipse(img, x, y, 0.82 * r, r, hr if kind == 1 else s, t)  # head
        if kind == 0:
            _ellipse(img, x, y - 0.1 * r, 0.88 * r, 0.98 * r, hr, t, 180, 360)  # hair on top
        elif kind == 2:
            _ellipse(img, x, y - 0.25 * r, 1.0 * r, 0.85 * r, ht, t, 180, 360)  # cap


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Camera effects: uneven light, lens blur, sensor noise."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w) - 0.5
    theta = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0.0, 0.5) * (xx * np.cos(theta) + yy * np.sin(theta))
    out = img.astype(np.float32) * light[..., None].astype(np.float32) * rng.uniform(0.8, 1.15)
    out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.4, 0.9) * max(h / _REF_HEIGHT, 0.5))
    out += rng.normal(0, rng.uniform(1.0, 4.0), out.shape).astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ToolkitError(f"{name} must be an integer >= {minimum}, got {value!r}")


def render_scene(rng: np.random.Generator, height: int, width: int,
                 count: int) -> tuple[np.ndarray, np.ndarray]:
    """One crowd scene: RGB uint8 image (H, W, 3) and float64 (count, 2) head points (x, y) in the image."""
    _check_int("height", height, 32)
    _check_int("width", width, 32)
    _check_int("count", count, 0)
    # separate streams: the same rng state gives the same background and camera whatever the count
    scene_rng, people_rng, camera_rng = (np.random.default_rng(s) for s in rng.integers(2**63, size=3))
    geo = _perspective(scene_rng, height)
    img = _background(scene_rng, geo, height, width)
    _draw_distractors(scene_rng, img, geo)
    pts, radii = _place_people(people_rng, geo, width, count)
    _draw_people(people_rng, img, pts, radii)
    return _finish(camera_rng, img), pts


def _draw_counts(rng: np.random.Generator, n: int, max_count: int) -> np.ndarray:
    """Counts covering 0..max_count: half uniform, half log-uniform (many sparse scenes), ~4% empty."""
    log_uniform = np.floor(np.exp(rng.uniform(0, np.log(max_count + 1), n)))
    uniform = np.ceil(rng.uniform(0, max_count, n))
    counts = np.where(rng.random(n) < 0.5, uniform, log_uniform).astype(int)
    counts[rng.choice(n, int(round(0.04 * n)), replace=False)] = 0
    return np.minimum(counts, max_count)


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise ToolkitError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())


def _manifest(params: dict) -> dict:
    return {"generator": "datasets/synthetic.py", "version": VERSION, **params}


def write_synthetic(root: Path, *, n_train: int = 120, n_test: int = 40, height: int = 240, width: int = 320,
                    max_count: int = 300, seed: int = 0) -> Path:
    """Write a synthetic set in ShanghaiTech layout at `root` (which must not hold files), atomically."""
    params = {"n_train": n_train, "n_test": n_test, "height": height, "width": width, "max_count": max_count,
              "seed": seed}
    for name, minimum in (("n_train", 0), ("n_test", 0), ("height", 32), ("width", 32), ("max_count", 0),
                          ("seed", 0)):
        _check_int(name, params[name], minimum)
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ToolkitError(f"{root} already exists and is not an empty folder; not overwriting it")
    root.parent.mkdir(parents=True, exist_ok=True)
    # built beside root and renamed into place, so a crash or a concurrent writer never leaves a half set
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        for split_index, (split, n) in enumerate(zip(_SPLITS, (n_train, n_test), strict=True)):
            (tmp / split / "images").mkdir(parents=True)
            (tmp / split / "ground_truth").mkdir()
            counts = _draw_counts(np.random.default_rng([seed, split_index]), n, max_count)
            for i, count in enumerate(counts, start=1):
                rng = np.random.default_rng([seed, split_index, i])
                img, pts = render_scene(rng, height, width, int(count))
                _write_jpeg(tmp / split / "images" / f"IMG_{i}.jpg", img)
                write_points(tmp / split / "ground_truth" / f"GT_IMG_{i}.mat", pts)
        (tmp / MANIFEST).write_text(json.dumps(_manifest(params), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def ensure_synthetic(root: Path | None = None, **params) -> Path:
    """A ready synthetic set with write_synthetic's `params`, generated only if missing.

    The default root is $CROWD_CACHE (or <repo>/.cache) / synthetic / <version and params>.
    """
    bound = inspect.signature(write_synthetic).bind(root, **params)
    bound.apply_defaults()
    p = {k: v for k, v in bound.arguments.items() if k != "root"}
    if root is None:
        cache = cache_dir()
        name = (f"v{VERSION}-s{p['seed']}-{p['n_train']}x{p['n_test']}-{p['height']}x{p['width']}"
                f"-c{p['max_count']}")
        root = cache / "synthetic" / name
    root = Path(root)
    wanted = _manifest(p)
    if not (root / MANIFEST).is_file():
        log.info("writing the synthetic crowd set to %s (once)", root)
        try:
            return write_synthetic(root, **p)
        except (OSError, ToolkitError):
            if not (root / MANIFEST).is_file():  # unless another process has just finished the same set
                raise
    found = json.loads((root / MANIFEST).read_text())
    if found != wanted:
        raise ToolkitError(f"{root} holds a synthetic set made with {found}, not the requested {wanted}")
    return root

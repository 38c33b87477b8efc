"""The patch engine: a (3, s, s) patch in [0, 1] RGB with a circle or square mask, applied to a batch of images
with random rotation, scale, brightness and placement, in one `affine_grid`/`grid_sample` on the device.

A `PatchSpec` says which patch is applied and how (side, mask shape, transform ranges, placement); it is built once
and carried by everything that applies, attacks with or certifies against a patch, and saved with the patch.
Composite: x' = (1 - M) * x + M * P, differentiable with respect to the patch only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.errors import ToolkitError
from utils.io import atomic_write, save_checkpoint

SHAPES = ("circle", "square")
PLACEMENTS = ("center", "random", "sweep")  # sweep: a grid of positions per image, for worst-case evaluation


@dataclass(frozen=True)
class PatchTransform:
    """Ranges of the random transforms (the paper's: ±5°, ×[0.975, 1.025], ±0.05)."""

    rotation: float = 5.0  # degrees, uniform in [-rotation, rotation]
    scale_min: float = 0.975
    scale_max: float = 1.025
    brightness: float = 0.05  # added to the patch, uniform in [-brightness, brightness]

    def __post_init__(self):
        if not (0 <= self.rotation <= 180 and 0 < min(self.scale_min, self.scale_max) and 0 <= self.brightness <= 1):
            raise ToolkitError(f"patch transform out of range: rotation {self.rotation} (0 to 180 degrees), "
                               f"scale {self.scale_min} to {self.scale_max} (positive), brightness {self.brightness} "
                               "(0 to 1)")

    @classmethod
    def none(cls) -> PatchTransform:
        return cls(rotation=0.0, scale_min=1.0, scale_max=1.0, brightness=0.0)


def make_mask(size: int, shape: str = "circle") -> torch.Tensor:
    """(1, s, s) mask: every pixel for `square`; pixel centres within s/2 of the centre for `circle`."""
    if shape not in SHAPES:
        raise ToolkitError(f"unknown patch shape {shape!r}; choose from {', '.join(SHAPES)}")
    if size <= 0:
        raise ToolkitError(f"patch size must be positive, got {size}")
    if shape == "square":
        return torch.ones(1, size, size)
    c = torch.arange(size) + 0.5 - size / 2
    return ((c[:, None] ** 2 + c[None, :] ** 2) <= (size / 2) ** 2).float()[None]


def random_patch(size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform noise in [0, 1]: the attack's start and the control patch."""
    return torch.rand(3, size, size, generator=generator)


def sweep_centers(height: int, width: int, size: int, per_side: int = 3) -> torch.Tensor:
    """(per_side², 2) patch centres (x, y) on an even grid that keeps the patch inside the image."""
    def axis(n: int) -> torch.Tensor:
        return torch.linspace(size / 2, n - size / 2, per_side) if per_side > 1 else torch.tensor([n / 2])

    ys, xs = torch.meshgrid(axis(height), axis(width), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


def sample_centers(n: int, height: int, width: int, size: int, placement: str,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2) centres (x, y) in pixels: the image centre, or uniform positions that keep the patch inside."""
    if placement == "center":
        return torch.tensor([[width / 2, height / 2]]).expand(n, 2).clone()
    if placement == "random":
        u = torch.rand(n, 2, generator=generator)
        return torch.stack([size / 2 + u[:, 0] * (width - size), size / 2 + u[:, 1] * (height - size)], dim=1)
    raise ToolkitError(f"placement {placement!r} has no random draw; choose center or random (sweep is for evaluation)")


def _paste(images: torch.Tensor, patch: torch.Tensor, mask: torch.Tensor, centers: torch.Tensor,
           transform: PatchTransform, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste `patch` (3, s, s) under `mask` (1, s, s) into every image of `images` (N, 3, H, W) at `centers` (N, 2).

    Each image gets its own random rotation, scale and brightness from `transform`. Returns the patched images
    and the (N, 1, H, W) coverage mask. Randomness is drawn on the CPU generator, then moved to the device.
    """
    n, _, h, w = images.shape
    size, t = patch.shape[-1], transform
    u = torch.rand(n, 3, generator=generator)
    angle = torch.deg2rad((2 * u[:, 0] - 1) * t.rotation)
    scale = t.scale_min + u[:, 1] * (t.scale_max - t.scale_min)
    bright = (2 * u[:, 2] - 1) * t.brightness

    # Inverse map from image pixels to patch coordinates, in the normalised [-1, 1] frames of affine_grid
    # (align_corners=False): patch = R(-angle) (pixel - centre) / (scale * s / 2).
    cos, sin, k = torch.cos(angle), torch.sin(angle), 2 / (scale * size)
    cx, cy = centers[:, 0].cpu().double(), centers[:, 1].cpu().double()
    ox, oy = w / 2 - cx, h / 2 - cy
    theta = torch.stack([
        torch.stack([cos * w / 2 * k, sin * h / 2 * k, (cos * ox + sin * oy) * k], dim=1),
        torch.stack([-sin * w / 2 * k, cos * h / 2 * k, (-sin * ox + cos * oy) * k], dim=1),
    ], dim=1).to(images.device, torch.float32, non_blocking=True)  # host to device: no wait for the device

    # The geometry in float32 whatever the images' dtype: in bfloat16 the sampling grid is off by pixels, and the
    # extent a certificate covers (`extent_side`) allows for float32 rounding only.

    # Premultiplied alpha: sample [clamp(P + b) · M, M] together, so edges blend without darkening.
    bright = bright.to(images.device, torch.float32, non_blocking=True).view(n, 1, 1, 1)
    shifted = (patch.float().unsqueeze(0) + bright).clamp(0, 1)
    source = torch.cat([shifted * mask.float(), mask.float().expand(n, 1, size, size)], dim=1)
    grid = F.affine_grid(theta, [n, 4, h, w], align_corners=False)
    canvas = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(images.dtype)
    covered = canvas[:, 3:]
    return images * (1 - covered) + canvas[:, :3], covered


def footprint_side(size: int, shape: str, transform: PatchTransform) -> int:
    """Side of the smallest square with at least as many pixels as one paste can change, at any placement
    and any draw of `transform`: a certificate for a patch of this side covers the engine's patch of `size`.

    A pixel changes only where bilinear sampling reaches a mask pixel centre, i.e. within 1 (per axis, in patch
    pixels) of one. Mask centres lie in the square of half-side s/2 - 1/2 (and, for a circle, within s/2 of the
    centre), so a changed pixel centre lies within scale · (s + 1)/2 · (cos θ + sin θ) of the patch centre per
    axis, and for a circle within scale · (s/2 + √2) in distance; the disc holds at most π(r + √2/2)² pixel
    centres, since their unit squares are disjoint and inside the disc of radius r + √2/2.
    """
    scale = max(transform.scale_min, transform.scale_max)
    theta = math.radians(min(abs(transform.rotation), 45.0))
    per_axis = math.ceil(scale * (size + 1) * (math.cos(theta) + math.sin(theta)))
    bound = per_axis**2
    if shape == "circle":
        r = scale * (size / 2 + math.sqrt(2))
        bound = min(bound, math.ceil(2 * r) ** 2, math.floor(math.pi * (r + math.sqrt(0.5)) ** 2))
    return math.isqrt(bound - 1) + 1


EXTENT_SLACK = 1e-3  # pixels: more than float32's error in the sampling grid of images up to 10^4 px wide


def extent_side(size: int, shape: str, transform: PatchTransform) -> int:
    """Side of the smallest axis-aligned square that holds every pixel one paste can change, at any placement
    (sub-pixel included) and any draw of `transform`: what a receptive-field certificate must cover.

    Proof. `_paste` samples the patch at u = R(−θ)(p − c)/σ + s/2 (patch pixels, centres at i + ½) for the image
    pixel centre p, patch centre c, angle θ and scale σ. Bilinear sampling with zero padding reads mask pixel
    centre m only where |u − m| < 1 on both axes, so pixel p changes only if p − c = σ R(θ)(m − s/2 + e) with
    m a mask centre and |e|∞ < 1. Its x offset is σ (cos θ (m_x + e_x) − sin θ (m_y + e_y)), writing m relative to
    the patch centre; the mask is symmetric under x ↦ −x, y ↦ −y and x ↔ y, so over θ ∈ [−θ*, θ*] (θ* = the
    rotation range, or 45°: the square's and circle's symmetries map any larger angle there) the offset along either
    axis is below σ max over θ ∈ [0, θ*] and m of a cos θ + b sin θ with a = |m_x| + 1, b = |m_y| + 1. Each term
    is √(a² + b²) cos(θ − φ), φ = atan2(b, a): its maximum on [0, θ*] is √(a² + b²) where φ ≤ θ*, else its value
    at θ*. So every changed pixel centre lies in an open interval of length 2h around c's coordinate, h = σ_max
    times that maximum, and an open interval of length L holds at most ⌈L⌉ pixel centres. `EXTENT_SLACK` absorbs
    the float32 rounding of the sampling grid.
    """
    offsets = make_mask(size, shape)[0].nonzero().double() + 0.5 - size / 2  # mask pixel centres, from the centre
    a, b = offsets[:, 1].abs() + 1, offsets[:, 0].abs() + 1
    theta = math.radians(min(abs(transform.rotation), 45.0))
    phi = torch.atan2(b, a)
    reach = torch.where(phi <= theta, torch.hypot(a, b), a * math.cos(theta) + b * math.sin(theta))
    h = max(transform.scale_min, transform.scale_max) * float(reach.max())
    return math.ceil(2 * h + 2 * EXTENT_SLACK)


@dataclass(frozen=True)
class PatchSpec:
    """Which patch is applied and how: its side in pixels, mask shape, random transform ranges and where it goes
    (`center` or `random`; evaluation may also `sweep` a grid). Built once, from the command line or a saved patch,
    and carried by the attack, the adversarial recipe, the probe attack and the certificates."""

    side: int
    shape: str = "circle"
    transform: PatchTransform = field(default_factory=PatchTransform)
    placement: str = "center"

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ToolkitError(f"unknown patch shape {self.shape!r}; choose from {', '.join(SHAPES)}")
        if not isinstance(self.side, int) or self.side <= 0:
            raise ToolkitError(f"patch side must be a positive number of pixels, got {self.side}")
        if self.placement not in PLACEMENTS[:2]:
            raise ToolkitError(f"placement {self.placement!r} has no random draw; choose center or random "
                               "(sweep is for evaluation)")

    @cached_property
    def mask(self) -> torch.Tensor:
        """(1, s, s): every pixel for `square`; pixel centres within s/2 of the centre for `circle`."""
        return make_mask(self.side, self.shape)

    @cached_property
    def footprint_side(self) -> int:
        """Side of a square holding at least as many pixels as one paste can change (rotation, scale and bilinear
        rim included), and at least the nominal side: what a certificate must cover for this patch."""
        return max(self.side, footprint_side(self.side, self.shape, self.transform))

    @cached_property
    def extent_side(self) -> int:
        """Side of the smallest axis-aligned square holding every pixel one paste can change (rotation, scale,
        bilinear rim and sub-pixel placement included): what a receptive-field certificate must cover."""
        return extent_side(self.side, self.shape, self.transform)

    def check_fits(self, side: int, what: str) -> None:
        """The one check that the patch fits: `side` is the shortest side of `what` (images, crops...)."""
        if self.side > side:
            raise ToolkitError(f"patch side {self.side} is larger than {what} ({side} px)")

    def paste(self, images: torch.Tensor, patch: torch.Tensor, centers: torch.Tensor,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Paste `patch` (3, s, s) into every image of `images` (N, 3, H, W) at `centers` (N, 2) (x, y in pixels),
        each with its own draw of the transform: (patched images, (N, 1, H, W) coverage)."""
        h, w = images.shape[-2:]
        self.check_fits(min(h, w), f"the images ({h}×{w})")
        if patch.shape[-1] != self.side:
            raise ToolkitError(f"a {patch.shape[-1]}-pixel patch does not match its spec (side {self.side})")
        masks = self.__dict__.setdefault("_masks", {})  # the mask copied to each device and dtype once
        key = (images.device, images.dtype)
        if key not in masks:
            masks[key] = self.mask.to(*key)
        return _paste(images, patch, masks[key], centers, self.transform, generator)

    def apply(self, images: torch.Tensor, patch: torch.Tensor, generator: torch.Generator | None = None,
              placement: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`paste` at positions drawn by `placement` (default: the spec's)."""
        n, _, h, w = images.shape
        centers = sample_centers(n, h, w, self.side, placement or self.placement, generator)
        return self.paste(images, patch, centers, generator)

    def to_dict(self) -> dict:
        return {"side": self.side, "shape": self.shape, "transform": asdict(self.transform),
                "placement": self.placement}

    @classmethod
    def from_dict(cls, d: dict) -> PatchSpec:
        return cls(int(d["side"]), d.get("shape", "circle"), PatchTransform(**d.get("transform", {})),
                   d.get("placement", "center"))


def save_patch(out: Path, patch: torch.Tensor, spec: PatchSpec, extra: dict | None = None) -> None:
    """`patch.pt` (the tensor and its spec), `patch.png` (the masked patch on white at its real size: one image
    pixel per patch pixel, the printable artefact) and `patch_x8.png` (an enlarged view to look at: nearest-neighbour
    ×`VIEW_SCALE`, one white patch pixel of margin all round, the mask outline drawn in red just outside the mask)."""
    from PIL import Image

    if patch.shape[-1] != spec.side:
        raise ToolkitError(f"a {patch.shape[-1]}-pixel patch does not match its spec (side {spec.side})")
    save_checkpoint(out / "patch.pt", {"patch": patch.detach().cpu().float(), "spec": spec.to_dict(), **(extra or {})})
    mask = spec.mask
    rgb = (patch.detach().cpu().float() * mask + (1 - mask)).clamp(0, 1)
    img = Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    atomic_write(out / "patch.png", lambda tmp: img.save(tmp, format="PNG"))
    view = Image.fromarray((enlarged_view(rgb, mask).permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    atomic_write(out / f"patch_x{VIEW_SCALE}.png", lambda tmp: view.save(tmp, format="PNG"))


VIEW_SCALE = 8  # patch_x8.png: a 20 px patch (2 % of 1024) becomes 176 px, a 40 px one 336 px
OUTLINE = (0.85, 0.0, 0.0)  # red, on the white margin around the mask


def enlarged_view(rgb: torch.Tensor, mask: torch.Tensor, scale: int = VIEW_SCALE, outline: int = 2) -> torch.Tensor:
    """(3, (s + 2)·scale, (s + 2)·scale): the (3, s, s) masked patch `rgb` on white with one white patch pixel of
    margin, each pixel a scale × scale block (nearest neighbour), and an `outline`-pixel red line just outside the
    (1, s, s) mask, so the patch's own pixels stay untouched."""
    rgb = F.pad(rgb.float(), (1, 1, 1, 1), value=1.0)
    inside = F.pad(mask.float(), (1, 1, 1, 1), value=0.0) > 0.5
    big = rgb.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    inside = inside.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    near = F.max_pool2d(inside[None].float(), 2 * outline + 1, stride=1, padding=outline)[0] > 0
    ring = (near & ~inside)[0]
    for c, value in enumerate(OUTLINE):
        big[c][ring] = value
    return big


def load_patch(path: str | Path) -> tuple[torch.Tensor, PatchSpec]:
    """A saved patch: the (3, s, s) tensor and the spec it was made with (files of older versions: their size, shape
    and transform)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ToolkitError(f"patch file not found: {path}") from None
    except Exception as e:
        raise ToolkitError(f"cannot read patch file {path}: {e}") from None
    patch = state.get("patch") if isinstance(state, dict) else None
    if not isinstance(patch, torch.Tensor) or patch.dim() != 3 or patch.shape[0] != 3 \
            or patch.shape[1] != patch.shape[2]:
        shape = tuple(patch.shape) if isinstance(patch, torch.Tensor) else None
        raise ToolkitError(f"{path} does not hold a (3, s, s) patch (found {shape})")
    saved = state.get("spec") or {"side": patch.shape[-1], "shape": state.get("shape", "circle"),
                                  "transform": state.get("transform", {})}
    spec = PatchSpec.from_dict(saved)
    if spec.side != patch.shape[-1]:
        raise ToolkitError(f"{path}: the patch is {patch.shape[-1]} pixels wide, its spec says {spec.side}")
    return patch, spec


def patch_side(frac: float, reference: int = 1024) -> int:
    """The paper's patch side: int(frac × 1024), so 0.02/0.04/0.08/0.16 give 20/40/81/163 px."""
    return int(reference * frac)

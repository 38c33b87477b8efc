"""PNG figures: jet density maps beside their image, and training curves. Written atomically, no display."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.io import atomic_write  # noqa: E402


def _array(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _save(fig, path: str | Path) -> Path:
    path = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def density_figure(path: str | Path, image, panels: Sequence[tuple[str, object]], title: str = "") -> Path:
    """The image (3, H, W in [0, 1]) then one jet panel per `(label, density)`; labels carry the counts."""
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4 * (1 + len(panels)), 3.4))
    axes = np.atleast_1d(axes)
    axes[0].imshow(_array(image).transpose(1, 2, 0).clip(0, 1))
    axes[0].set_title(title or "image")
    for ax, (label, density) in zip(axes[1:], panels, strict=True):
        den = _array(density).squeeze()
        ax.imshow(den, cmap="jet")
        ax.set_title(f"{label}: {den.sum():.1f}")
    for ax in axes:
        ax.axis("off")
    return _save(fig, path)


def image_panels(path: str | Path, panels: Sequence[tuple[str, object]]) -> Path:
    """Side-by-side panels: (3, H, W) images as RGB, (H, W) maps in jet."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (label, item) in zip(np.atleast_1d(axes), panels, strict=True):
        arr = _array(item)
        ax.imshow(arr.transpose(1, 2, 0).clip(0, 1) if arr.ndim == 3 else arr, cmap=None if arr.ndim == 3 else "jet")
        ax.set_title(label)
        ax.axis("off")
    return _save(fig, path)


def interval_figure(path: str | Path, rows: Sequence[dict], sides: Sequence[int]) -> Path:
    """Certified [L, U] per image (sorted by ground truth) for each patch side, with the truth and smoothed count."""
    rows = sorted(rows, key=lambda r: r["gt"])
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(rows)), 3.6))
    for k, side in enumerate(sorted(sides, reverse=True)):
        lo, hi = np.array([r[f"L{side}"] for r in rows]), np.array([r[f"U{side}"] for r in rows])
        ax.vlines(x + 0.08 * k, lo, hi, colors=plt.cm.viridis(k / max(len(sides) - 1, 1)), lw=3, label=f"{side} px")
    ax.plot(x, [r["gt"] for r in rows], "k_", ms=10, label="ground truth")
    ax.plot(x, [r["smoothed"] for r in rows], "r.", label="smoothed count")
    ax.set_xlabel("image (sorted by ground truth)")
    ax.set_ylabel("count")
    ax.legend(fontsize=7)
    return _save(fig, path)


def curve_figure(path: str | Path, series: dict[str, Sequence[float]], xlabel: str = "epoch",
                 ylabel: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, ys in series.items():
        ax.plot(range(1, len(ys) + 1), ys, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def bar_figure(path: str | Path, groups: dict[str, dict[str, float]], ylabel: str = "") -> Path:
    """Grouped bars: one group per key of `groups`, one bar per inner key (the same inner keys in every group)."""
    labels = list(next(iter(groups.values())))
    x, width = np.arange(len(groups)), 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups), 3.4))
    for k, label in enumerate(labels):
        ax.bar(x + k * width, [g[label] for g in groups.values()], width, label=label)
    ax.set_xticks(x + width * (len(labels) - 1) / 2, list(groups))
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return _save(fig, path)

"""Figures: jet density maps beside their image, certified intervals, bars and training curves.

Written atomically, no display. The file format follows the path's suffix: `.png` (raster, `DPI`), `.pdf` or
`.svg` (vector; images inside stay raster). Builders (`_density_fig`, `_curve_fig`, ...) return the matplotlib
Figure, so tests can inspect it; the public writers build, save and close it.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from utils.errors import ToolkitError  # noqa: E402
from utils.io import atomic_write  # noqa: E402
from utils.text import plural  # noqa: E402

FORMATS = ("png", "pdf", "svg")
DPI = 130
DENSITY_LABEL = "density (people per output cell)"


def _array(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def figure_format(path: str | Path) -> str:
    """The format a figure path asks for, from its suffix: png, pdf or svg."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ToolkitError(f"cannot write figure {path}: the suffix must be one of "
                           f"{', '.join('.' + f for f in FORMATS)}")
    return fmt


def _save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` in the format of `path`'s suffix (png at `DPI`, pdf / svg as vectors) and close it."""
    try:
        fmt = figure_format(path)
        options = {"png": {"dpi": DPI}, "pdf": {"metadata": {"CreationDate": None}},
                   "svg": {"metadata": {"Date": None}}}[fmt]  # no dates: the same figure, the same bytes
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, bbox_inches="tight", **options))
    finally:
        plt.close(fig)


def _count(x: float) -> str:
    """A head count as people read it: 130, or 129.5 when the annotation is fractional."""
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _density_fig(image, panels: Sequence[tuple[str, object]], title: str = "", truth: float | None = None
                 ) -> Figure:
    """The image (3, H, W in [0, 1]) then one jet panel per `(label, density)`, all on one colour scale
    (0 to the largest value of any panel) with one colourbar; panel titles carry their count and the truth."""
    dens = [_array(density).squeeze() for _, density in panels]
    vmax = max((float(d.max()) for d in dens if d.size), default=0.0)
    norm = Normalize(vmin=0.0, vmax=vmax if vmax > 0 else 1e-6)
    n = 1 + len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.8, 3.6), layout="constrained")
    axes = np.atleast_1d(axes)
    axes[0].imshow(_array(image).transpose(1, 2, 0).clip(0, 1))
    axes[0].set_title((title or "image") + (f"\nground truth: {_count(truth)} people" if truth is not None else ""),
                      fontsize=9)
    shown = None
    for ax, (label, _), den in zip(axes[1:], panels, dens, strict=True):
        shown = ax.imshow(den, cmap="jet", norm=norm, interpolation="nearest")
        ax.set_title(f"{label}: {den.sum():.1f}" + (f" (truth {_count(truth)})" if truth is not None else ""),
                     fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if shown is not None:
        extend = "min" if any(d.size and d.min() < 0 for d in dens) else "neither"
        fig.colorbar(shown, ax=list(axes[1:]), label=DENSITY_LABEL, shrink=0.9, extend=extend)
    return fig


def density_figure(path: str | Path, image, panels: Sequence[tuple[str, object]], title: str = "",
                   truth: float | None = None) -> Path:
    """Write `_density_fig`: the image, then the `(label, density)` panels on one shared, labelled colour scale."""
    return _save(_density_fig(image, panels, title, truth), path)


def _panels_fig(panels: Sequence[tuple], title: str = "") -> Figure:
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), layout="constrained")
    for ax, (label, item, *colorbar) in zip(np.atleast_1d(axes), panels, strict=True):
        arr = _array(item)
        if arr.ndim == 3:
            ax.imshow(arr.transpose(1, 2, 0).clip(0, 1))
        else:
            cmap = plt.get_cmap("jet").with_extremes(bad="white")  # NaN: nothing to show there
            shown = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, interpolation="nearest")
            if colorbar:
                fig.colorbar(shown, ax=ax, label=colorbar[0], shrink=0.8)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def image_panels(path: str | Path, panels: Sequence[tuple], title: str = "") -> Path:
    """Side-by-side panels (label, item[, colourbar label]): (3, H, W) images as RGB, (H, W) maps in jet (NaN
    white), a map with a colourbar where its label is given."""
    return _save(_panels_fig(panels, title), path)


def _window_fig(image, density, boxes: Sequence[tuple[str, tuple[int, int, int, int], str]], title: str) -> Figure:
    """The image with labelled (top, left, height, width) boxes, and its density map with the same boxes."""
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0), layout="constrained")
    axes[0].imshow(_array(image).transpose(1, 2, 0).clip(0, 1))
    axes[0].set_title("image", fontsize=9)
    axes[1].set_title("density of the model", fontsize=9)
    den = _array(density).squeeze()
    shown = axes[1].imshow(den, cmap="jet", vmin=0, extent=(0, image.shape[-1], image.shape[-2], 0),
                           interpolation="nearest")
    fig.colorbar(shown, ax=axes[1], label=DENSITY_LABEL, shrink=0.9)
    for ax in axes:
        for label, (top, left, height, width), color in boxes:
            ax.add_patch(Rectangle((left, top), width, height, fill=False, edgecolor=color, lw=2, clip_on=False,
                                   label=label if ax is axes[0] else None))  # unclipped: an edge on the border shows
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=9)
    return fig


def window_figure(path: str | Path, image, density, boxes: Sequence[tuple[str, tuple[int, int, int, int], str]],
                  title: str) -> Path:
    """Write `_window_fig`: where on the image (and its density) a patch hides or adds the most people."""
    return _save(_window_fig(image, density, boxes, title), path)


def _finite(values) -> np.ndarray:
    values = np.asarray(list(values), dtype=float).ravel()
    return values[np.isfinite(values)]


def _from_zero(ax, values, headroom: float = 1.05) -> None:
    """Start the y axis at 0 when every finite value is non-negative (a change then looks its real size)."""
    values = _finite(values)
    if values.size and values.min() >= 0:
        ax.set_ylim(0, max(float(values.max()) * headroom, 1e-9))


PER_IMAGE_AT_MOST = 40  # an interval figure names each image up to this many; beyond, L and U against the truth


def _side_count(row: dict, side: int) -> float:
    """The count of the counter that certifies `side` (rf-mask has one per side)."""
    return row.get(f"count{side}", row.get("count"))


def _interval_fig(rows: Sequence[dict], sides: Sequence[int], title: str = "") -> Figure:
    sides = sorted(sides)
    colors = {s: plt.cm.viridis(k / max(len(sides) - 1, 1) * 0.85) for k, s in enumerate(sides)}
    uncertified = {s: sum(1 for r in rows if not np.isfinite(r[f"L{s}"])) for s in sides}
    notes = ", ".join(f"{s} px: {n} of {len(rows)}" for s, n in uncertified.items() if n)
    heading = title or f"certified count intervals [L, U] per patch side ({plural(len(rows), 'image')})"
    if len(rows) > PER_IMAGE_AT_MOST:
        fig, axes = plt.subplots(1, len(sides), figsize=(3.2 * len(sides) + 0.6, 3.6), layout="constrained",
                                 sharex=True, sharey=True, squeeze=False)
        gt = np.array([r["gt"] for r in rows])
        top = max([float(gt.max())] + [float(v) for v in _finite(r[f"U{s}"] for r in rows for s in sides)])
        for ax, side in zip(axes[0], sides, strict=True):
            lo, hi = (np.array([r[f"{e}{side}"] for r in rows], dtype=float) for e in "LU")
            ax.vlines(gt, lo, hi, colors=colors[side], lw=0.8, alpha=0.5)
            ax.plot(gt, hi, "^", ms=3, color=colors[side], label="U")
            ax.plot(gt, lo, "v", ms=3, color="0.35", label="L")
            ax.plot([0, top], [0, top], "k--", lw=0.8, label="truth (L = U = true count)")
            missing = [r["gt"] for r in rows if not np.isfinite(r[f"L{side}"])]
            if missing:
                ax.plot(missing, missing, "rx", ms=5, label="not certified")
            ax.set_title(f"{side} px patch", fontsize=9)
            ax.set_xlabel("true count (people)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("certified bound (people)")
        axes[0][0].set_xlim(0, top * 1.03)
        axes[0][0].set_ylim(0, top * 1.03)
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
        fig.suptitle(heading + (f"\nnot certified: {notes}" if notes else ""), fontsize=10)
        return fig

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5.6, 0.42 * len(rows) + 2.4), 3.9), layout="constrained")
    width = 0.6 / len(sides)
    per_side = all(f"count{s}" in r for r in rows for s in sides)
    for k, side in enumerate(sides):
        at = x + (k - (len(sides) - 1) / 2) * width
        lo, hi = (np.array([r[f"{e}{side}"] for r in rows], dtype=float) for e in "LU")
        ax.vlines(at, lo, hi, colors=colors[side], lw=4, label=f"[L, U], {side} px patch")
        counts = np.array([_side_count(r, side) for r in rows], dtype=float)
        if per_side:
            ax.plot(at, counts, "o", ms=4, mfc="white", mec=colors[side], label=f"its counter's count, {side} px")
        bad = ~np.isfinite(lo)
        ax.plot(at[bad], counts[bad], "rx", ms=7)
    if not per_side:
        ax.plot(x, [r["count"] for r in rows], "o", ms=4, mfc="white", mec="r", label="certified counter's count")
    if notes:
        ax.plot([], [], "rx", ms=7, label="side not certified")
    ax.plot(x, [r["gt"] for r in rows], "k_", ms=14, mew=2, label="true count")
    _from_zero(ax, [*(r["gt"] for r in rows), *(r[f"{e}{s}"] for r in rows for s in sides for e in "LU"),
                    *(_side_count(r, s) for r in rows for s in sides)])
    ax.set_xticks(x, [str(r.get("image", i)) for i, r in enumerate(rows)], rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(heading + (f"\nnot certified: {notes}" if notes else ""), fontsize=10)
    ax.set_ylabel("count (people)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3, axis="y")
    return fig


def interval_figure(path: str | Path, rows: Sequence[dict], sides: Sequence[int], title: str = "") -> Path:
    """Certified [L, U] per patch side: up to `PER_IMAGE_AT_MOST` images, one named column each in the rows'
    order with the true count and each side's counter's count; more, one panel per side with L and U against the
    true count. Sides not certified (L, U NaN) are marked and counted in the title."""
    return _save(_interval_fig(rows, sides, title), path)


def _count_over_time_fig(rows: Sequence[dict], sides: Sequence[int], per_side: bool, title: str = "") -> Figure:
    frames = np.array([r["frame"] for r in rows])
    fig, ax = plt.subplots(figsize=(7.2, 3.6), layout="constrained")
    for k, side in enumerate(sorted(sides, reverse=True)):
        color = plt.cm.viridis(k / max(len(sides) - 1, 1))
        ax.fill_between(frames, [r[f"L{side}"] for r in rows], [r[f"U{side}"] for r in rows], color=color, alpha=0.3,
                        step="mid", label=f"certified band, {side} px patch")
        if per_side:
            ax.plot(frames, [r[f"count{side}"] for r in rows], color=color, lw=1, label=f"rf-mask count, {side} px")
    ax.plot(frames, [r["count"] for r in rows], "k-", lw=1.2, label="model count" if per_side else "count")
    _from_zero(ax, [r[k] for r in rows for k in ("count", *(f"{e}{s}" for s in sides for e in "LU"))])
    ax.set_title(title or "count over time", fontsize=10)
    ax.set_xlabel("frame")
    ax.set_ylabel("count (people)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    return fig


def count_over_time_figure(path: str | Path, rows: Sequence[dict], sides: Sequence[int], per_side: bool,
                           title: str = "") -> Path:
    """A video's count per frame with, per patch side, the band [L, U] no patch of that side can push it out of
    (`per_side`: rf-mask, whose count differs per side, drawn too)."""
    return _save(_count_over_time_fig(rows, sides, per_side, title), path)


def _change(label: str, values: np.ndarray) -> str | None:
    """`label: first → last (relative change)`, or None for a constant or too short series."""
    if values.size < 2 or values[0] == values[-1]:
        return None
    first, last = float(values[0]), float(values[-1])
    rel = f" ({(last - first) / abs(first):+.1%})" if first != 0 else ""
    return f"{label}: {first:.4g} → {last:.4g}{rel}"


def _curve_fig(series: dict[str, Sequence[float]], xlabel: str = "epoch", ylabel: str = "", title: str = ""
               ) -> Figure:
    """One line per series over epochs 1, 2, ... The y axis starts at 0 when no value is negative; otherwise it
    fits the data and the first and last values are written on the curve. The title gives each series' change."""
    fig, ax = plt.subplots(figsize=(5.6, 3.8), layout="constrained")
    notes, everything, ends = [], [], []
    for label, ys in series.items():
        ys = np.asarray(list(ys), dtype=float)
        xs = np.arange(1, len(ys) + 1)
        (line,) = ax.plot(xs, ys, label=label, marker="o" if len(ys) <= 30 else None, ms=3)
        finite = np.isfinite(ys)
        everything.append(ys[finite])
        notes.append(_change(label, ys[finite]))
        if finite.any():
            xs, ys = xs[finite], ys[finite]
            ends += [(xs[0], ys[0], line.get_color()), (xs[-1], ys[-1], line.get_color())][:len(xs)]
    notes = [n for n in notes if n]
    values = np.concatenate(everything) if everything else np.empty(0)
    _from_zero(ax, values, headroom=1.08)
    if values.size and values.min() < 0:  # no anchor at 0: write the end values so the scale cannot mislead
        ax.margins(y=0.12)  # room for them inside the frame
        for x, y, color in ends:
            ax.annotate(f"{y:.4g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7,
                        color=color)
    ax.set_title("\n".join([title or ylabel or "curve", *notes]), fontsize=10 if not notes else 9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    longest = max((len(list(ys)) for ys in series.values()), default=1)
    ax.set_xlim(0.5, max(longest, 1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one epoch: the tick 1, not 0.945, 0.96…
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def curve_figure(path: str | Path, series: dict[str, Sequence[float]], xlabel: str = "epoch",
                 ylabel: str = "", title: str = "") -> Path:
    """Write `_curve_fig`: titled, labelled curves over integer epochs with an honest y axis."""
    return _save(_curve_fig(series, xlabel, ylabel, title), path)


def _bar_fig(groups: dict[str, dict[str, float]], ylabel: str = "", title: str = "", xlabel: str = "") -> Figure:
    labels = list(next(iter(groups.values())))
    x, width = np.arange(len(groups)), 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(groups), 3.8), layout="constrained")
    for k, label in enumerate(labels):
        bars = ax.bar(x + k * width, [g[label] for g in groups.values()], width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(x + width * (len(labels) - 1) / 2, list(groups))
    _from_zero(ax, [v for g in groups.values() for v in g.values()], headroom=1.15)  # room for the values
    ax.set_title(title or ylabel, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return fig


def bar_figure(path: str | Path, groups: dict[str, dict[str, float]], ylabel: str = "", title: str = "",
               xlabel: str = "") -> Path:
    """Grouped bars: one group per key of `groups`, one bar per inner key (the same inner keys in every group),
    each bar's value written on it, the y axis from 0."""
    return _save(_bar_fig(groups, ylabel, title, xlabel), path)


def _tradeoff_fig(points: dict[str, dict[int, tuple[float, float, float]]], title: str = "",
                  floors: dict[int, float] | None = None) -> Figure:
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    markers = "osD^v<>p"
    sides = sorted({side for per_side in points.values() for side in per_side})
    shape = {side: markers[k % len(markers)] for k, side in enumerate(sides)}
    cleans = [c for per_side in points.values() for c, _, _ in per_side.values()]
    tights = [t for per_side in points.values() for _, t, _ in per_side.values() if t == t]
    right = 1.15 * max(cleans)
    top = 1.12 * max(tights + [max(cleans), *(floors or {}).values()])
    handles, partial, nothing = [], False, False
    palette = plt.get_cmap("tab10" if len(points) <= 10 else "tab20").colors  # a colour per model, none repeated
    for k, (label, per_side) in enumerate(points.items()):
        certified = [(s, c, t) for s, (c, t, _) in sorted(per_side.items()) if t == t]
        color = palette[k % len(palette)]
        ax.plot([c for _, c, _ in certified], [t for _, _, t in certified], color=color, alpha=0.5, lw=1)
        handles.append(Line2D([], [], color=color, lw=2, label=label))
        for side, (clean, tight, fraction) in sorted(per_side.items()):
            if tight != tight:  # no image certified: no worst case to plot, so drawn at the top, pointing up
                ax.plot(clean, top * 0.97, "^", color=color, ms=8, mfc="white", mew=1.5)
                ax.annotate(f"{side} px: none certified", (clean, top * 0.97), textcoords="offset points",
                            xytext=(6, -3), fontsize=6.5, color=color)
                nothing = True
                continue
            hollow = fraction < 1
            ax.plot(clean, tight, shape[side], color=color, ms=7, mfc="white" if hollow else color, mew=1.5)
            if hollow:
                ax.annotate(f"{fraction:.0%} certified", (clean, tight), textcoords="offset points", xytext=(6, -3),
                            fontsize=6.5, color=color)
                partial = True
    handles += [Line2D([], [], ls="", marker=shape[s], color="0.3", label=f"{s} px patch") for s in sides]
    if partial:
        handles.append(Line2D([], [], ls="", marker="o", color="0.3", mfc="white", label="some images not certified"))
    if nothing:
        handles.append(Line2D([], [], ls="", marker="^", color="0.3", mfc="white",
                              label="none certified (drawn at the top)"))
    ax.plot([0, right], [0, right], "k:", lw=0.8)
    handles.append(Line2D([], [], color="k", ls=":", lw=0.8, label="worst case = clean error"))
    shown = {side: floor for side, floor in sorted((floors or {}).items()) if side in sides}
    for floor in shown.values():  # no counter's worst case can lie below its side's floor
        ax.axhline(floor, color="0.5", ls="--", lw=0.7)
    if shown:
        handles.append(Line2D([], [], color="0.5", ls="--", lw=0.7, label="floor (most heads under an s×s square):\n"
                              + ", ".join(f"{side} px {value:.1f}" for side, value in shown.items())))
    ax.set_xlim(0, right)
    ax.set_ylim(0, top)
    ax.set_xlabel("clean MAE of the certified counter")
    ax.set_ylabel("certified worst case: tight-MAE")
    ax.set_title(title or "certified trade-off: clean error against certified worst case", fontsize=10)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # outside: clear of points
    ax.grid(alpha=0.3)
    return fig


def tradeoff_figure(path: str | Path, points: dict[str, dict[int, tuple[float, float, float]]],
                    floors: dict[int, float] | None = None, title: str = "") -> Path:
    """Per model (a colour) and patch side (a marker shape): (clean MAE of the certified counter, tight-MAE, share of
    images certified), both axes from 0. A side partly certified is a hollow marker with its share written; one with
    nothing certified (tight-MAE NaN) a hollow triangle at the top. The diagonal is where the worst case equals the
    clean error, the dashed lines the floors of `floors`."""
    return _save(_tradeoff_fig(points, title, floors), path)

"""Counting metrics. What crowd-counting papers call "MSE" is the root of the mean squared count error: it is
written here, and in every metrics.json, as `rmse`."""
from __future__ import annotations

import numpy as np
import torch


def mae(pred, gt) -> float:
    return float(np.mean(np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(gt, dtype=np.float64))))


def rmse(pred, gt) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, dtype=np.float64) - np.asarray(gt, dtype=np.float64)) ** 2)))


def game(pred: torch.Tensor, gt: torch.Tensor, level: int) -> float:
    """Grid Average Mean absolute Error of one image: |count error| summed over a 2^L × 2^L grid of regions.

    `pred` and `gt` are densities of the same (h, w); the regions partition the map as evenly as its size allows.
    """
    cells = 2**level
    h, w = pred.shape[-2:]
    rows, cols = _cell_index(h, cells, pred.device), _cell_index(w, cells, pred.device)
    region = (rows[:, None] * cells + cols[None, :]).flatten()
    diff = (pred - gt).reshape(-1).double()
    return float(torch.zeros(cells * cells, dtype=torch.float64, device=pred.device).index_add_(0, region, diff)
                 .abs().sum())


def _cell_index(n: int, cells: int, device) -> torch.Tensor:
    """Cell of each of n positions when cell i spans [floor(i n / cells), floor((i + 1) n / cells))."""
    bounds = torch.tensor([i * n // cells for i in range(1, cells)], device=device)
    return torch.bucketize(torch.arange(n, device=device), bounds, right=True)


def summarize(pred, gt) -> dict[str, float]:
    return {"mae": mae(pred, gt), "rmse": rmse(pred, gt)}


COUNT_BINS = (50, 100, 200, 400)  # ground-truth counts where ShanghaiTech's scenes change character


def by_count(pred, gt, edges: tuple[int, ...] = COUNT_BINS) -> list[dict]:
    """MAE and mean signed error (`bias`, negative: undercounting) of the images whose ground truth lies in each
    interval [edges[i-1], edges[i]) (the first from 0, the last open); intervals with no image are left out."""
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    bounds = [0, *edges, np.inf]
    rows = []
    for low, high in zip(bounds[:-1], bounds[1:], strict=True):
        inside = (gt >= low) & (gt < high)
        if inside.any():
            error = pred[inside] - gt[inside]
            rows.append({"gt_from": low, "gt_below": None if high == np.inf else high, "images": int(inside.sum()),
                         "mae": float(np.abs(error).mean()), "bias": float(error.mean())})
    return rows

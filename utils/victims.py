"""The embedded default victim: a model trained on the synthetic crowds with train.py's defaults, cached.

The victim of seed s is trained from initial weights, crops and batch order drawn from s, on 90 % of the synthetic
train split; the other 10 % (a seeded draw of the train split, never the test split) picks the epoch kept
(`best.pt`, the lowest validation MAE). Whole-image MAE swings from epoch to epoch (on the test split, 15 to 32 in
one draw), and where a run ends on that swing depends on float rounding, so the last epoch's model differs between
machines far more than the best epoch on held-out data does.

MCNN's original N(0, 0.01) init sometimes gives a final ReLU that dies in the first steps (seed 1 does: it predicts
0 everywhere from the first epoch, and a dead ReLU gets no gradient to recover); the training then starts again
from the init of the next attempt (`init_seed`), with the same crops, order and validation part.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from datasets.crowd import CrowdDataset
from datasets.synthetic import VERSION as SYNTHETIC_VERSION
from datasets.synthetic import ensure_synthetic
from models import build
from utils import distributed
from utils.errors import ToolkitError
from utils.runtime import cache_dir
from utils.training import DEFAULTS, VALIDATION, Recipe, fit

log = logging.getLogger(__name__)

RECIPE = 4  # bump when the training recipe or its random draws change (the synthetic set has its own version)
ERASE = 0.5  # random erasing with noise: the victim should count heads, not busy texture
ATTEMPTS = 5  # fresh inits tried when the model dies (predicts 0 everywhere)


def synthetic_victim(name: str = "mcnn", device: torch.device | None = None, seed: int = 0) -> Path:
    """Checkpoint of `name` trained on the synthetic default with `seed`; trained on first use (minutes), then
    reused (one cache entry per model, seed and recipe). Under torchrun rank 0 trains it alone, as one process
    would, while the other ranks wait."""
    with distributed.main_first():
        return _cached_victim(name, device, seed)


def victim_dir(name: str = "mcnn", seed: int = 0) -> Path:
    """Where the victim of `name` and `seed` is cached."""
    return cache_dir() / "victims" / f"{name}-synthetic{SYNTHETIC_VERSION}-recipe{RECIPE}-seed{seed}"


def init_seed(seed: int, attempt: int) -> int:
    """The initial weights of the victim of `seed` at `attempt` (0: `seed` itself)."""
    return seed + 1000 * attempt


class _Dead(Exception):
    pass


class _Watched(Recipe):
    """Plain training that stops at the first epoch whose validation counts are all exactly 0 (a dead ReLU)."""

    def validate(self, model, test_set, device, amp, epoch):
        metrics, rows = super().validate(model, test_set, device, amp, epoch)
        if all(r["pred"] == 0 for r in rows):
            raise _Dead(epoch + 1)
        return metrics, rows


def _cached_victim(name: str, device: torch.device | None, seed: int) -> Path:
    root = victim_dir(name, seed)
    if (root / "metrics.json").is_file():
        return root / "best.pt"
    log.info(f"no victim given: training {name} (seed {seed}) on the synthetic crowds once, cached in {root}")
    data = ensure_synthetic()
    for attempt in range(ATTEMPTS):
        model = build(name, seed=init_seed(seed, attempt))
        train_set, val_set = CrowdDataset.for_model(data / "train_data", model, crop=DEFAULTS["crop"],
                                                    erase=ERASE).holdout(VALIDATION, seed)
        tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            fit(model, train_set, val_set, None, tmp, epochs=DEFAULTS["epochs"], batch_size=DEFAULTS["batch_size"],
                lr=DEFAULTS["lr"], device=device or torch.device("cpu"), seed=seed, recipe=_Watched(),
                record={"victim": name, "erase": ERASE, "seed": seed, "init_seed": init_seed(seed, attempt),
                        "validation": {"share": VALIDATION, "images": val_set.names}, **DEFAULTS})
            os.replace(tmp, root)
            return root / "best.pt"
        except _Dead as dead:
            log.warning(f"the victim's init {init_seed(seed, attempt)} died at epoch {dead} (predicts 0 "
                        f"everywhere); starting again from init {init_seed(seed, attempt + 1)}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise ToolkitError(f"every one of {ATTEMPTS} inits of the {name} victim (seed {seed}) died in training")

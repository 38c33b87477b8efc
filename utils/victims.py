"""The embedded default victim: a model trained on the synthetic crowds with train.py's defaults, cached."""
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
from utils.runtime import cache_dir
from utils.training import DEFAULTS, fit

log = logging.getLogger(__name__)

RECIPE = 3  # bump when the training recipe or its random draws change (the synthetic set has its own version)
ERASE = 0.5  # random erasing with noise: the victim should count heads, not busy texture


def synthetic_victim(name: str = "mcnn", device: torch.device | None = None) -> Path:
    """Checkpoint of `name` trained on the synthetic default; trained on first use (minutes), then reused. Under
    torchrun rank 0 trains it alone, as one process would, while the other ranks wait."""
    with distributed.main_first():
        return _cached_victim(name, device)


def _cached_victim(name: str, device: torch.device | None) -> Path:
    root = cache_dir() / "victims" / f"{name}-synthetic{SYNTHETIC_VERSION}-recipe{RECIPE}"
    if (root / "metrics.json").is_file():
        return root / "last.pt"
    log.info(f"no victim given: training {name} on the synthetic crowds once, cached in {root}")
    data = ensure_synthetic()
    model = build(name, seed=0)
    train_set = CrowdDataset.for_model(data / "train_data", model, crop=DEFAULTS["crop"], erase=ERASE)
    test_set = CrowdDataset.for_model(data / "test_data", model)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        fit(model, train_set, test_set, tmp, epochs=DEFAULTS["epochs"], batch_size=DEFAULTS["batch_size"],
            lr=DEFAULTS["lr"], device=device or torch.device("cpu"),
            record={"victim": name, "erase": ERASE, **DEFAULTS})
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / "last.pt"

"""The embedded default victim: a model trained on the synthetic crowds with train.py's defaults, cached."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from datasets.crowd import CrowdDataset
from datasets.synthetic import VERSION as SYNTHETIC_VERSION
from models import build
from utils.cli import synthetic_splits
from utils.runtime import cache_dir, seed_everything
from utils.training import DEFAULTS, fit

RECIPE = 3  # bump when the training recipe or its random draws change (the synthetic set has its own version)
ERASE = 0.5  # random erasing with noise: the victim should count heads, not busy texture


def synthetic_victim(name: str = "mcnn", device: torch.device | None = None) -> Path:
    """Checkpoint of `name` trained on the synthetic default; trained on first use (minutes), then reused."""
    root = cache_dir() / "victims" / f"{name}-synthetic{SYNTHETIC_VERSION}-recipe{RECIPE}"
    if (root / "metrics.json").is_file():
        return root / "last.pt"
    print(f"no victim given: training {name} on the synthetic crowds once, cached in {root}")
    train_root, test_root = synthetic_splits()
    seed_everything(0)
    model = build(name)
    train_set = CrowdDataset.for_model(train_root, model, crop=DEFAULTS["crop"], erase=ERASE)
    test_set = CrowdDataset.for_model(test_root, model)
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

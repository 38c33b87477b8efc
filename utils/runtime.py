"""Device, seed and mixed-precision handling shared by every script."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from utils.errors import ToolkitError


def cache_dir() -> Path:
    """Where generated data and cached victims live: $CROWD_CACHE, else <repo>/.cache."""
    return Path(os.environ.get("CROWD_CACHE", Path(__file__).resolve().parents[1] / ".cache"))


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA, then MPS, then CPU; an explicit device that is not there is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ToolkitError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ToolkitError(f"device {name} asked for, but CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ToolkitError(f"device {name} asked for, but MPS is not available here")
    return device


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that is a fixed function of `keys` (e.g. run seed, epoch, item): random draws keyed this way
    are the same whatever the order, worker process or resume point that reaches them."""
    return int(np.random.SeedSequence([k % 2**32 for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def derived_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded with `derived_seed(*keys)`."""
    return torch.Generator().manual_seed(derived_seed(*keys))


def autocast(device: torch.device, enabled: bool = True):
    """float16 autocast on CUDA when enabled; a no-op elsewhere (CPU autocast does not pay for these convs)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to the device; channels-last on CUDA, where cuDNN's NHWC convolutions are faster."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model

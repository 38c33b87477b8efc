"""Device, seed and mixed-precision handling shared by every script."""
from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils import distributed
from utils.errors import ToolkitError


def cache_dir() -> Path:
    """Where generated data and cached victims live: $CROWD_CACHE, else <repo>/.cache."""
    return Path(os.environ.get("CROWD_CACHE", Path(__file__).resolve().parents[1] / ".cache"))


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA, then MPS, then CPU; an explicit device that is not there is an error. Under torchrun,
    this rank's device (cuda:LOCAL_RANK on CUDA), with the process group joined."""
    return distributed.setup(_device(name))


def _device(name: str) -> torch.device:
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


_bars: weakref.WeakSet = weakref.WeakSet()  # the bars `progress` made that are not yet garbage


class _Bar(tqdm):
    """tqdm, registered before its first draw: a signal can arrive after the bar is drawn and before it is returned."""

    def __init__(self, *args, **kwargs):
        _bars.add(self)
        super().__init__(*args, **kwargs)


def progress(iterable, desc: str, **kwargs) -> tqdm:
    """A transient tqdm bar, shown by rank 0 only under torchrun."""
    return _Bar(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=not distributed.is_main(), **kwargs)


def close_progress() -> None:
    """Close the bars still shown (a run cut short by an error or a signal), so that what is printed next starts on
    a line of its own instead of after a bar's text."""
    for bar in list(_bars):
        if hasattr(bar, "last_print_t"):
            bar.close()  # clears its line (the bars are transient)
        elif getattr(bar, "sp", None) is not None:  # cut short inside its first draw, which tqdm's close skips
            bar.fp.write("\n")


def batch_for_memory(forward: Callable[[int], object], device: torch.device, fraction: float, default: int,
                     most: int) -> int:
    """How many items to pass at once: on CUDA the largest batch (at most `most`) whose `forward(batch)` should fit
    in `fraction` of the free memory, from the peak memory of `forward(1)`; `default` elsewhere."""
    if device.type != "cuda":
        return default
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        forward(1)
    per_item = max(torch.cuda.max_memory_allocated(device) - before, 1)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(most, int(fraction * free) // per_item))


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that is a fixed function of `keys` (e.g. run seed, epoch, item): random draws keyed this way
    are the same whatever the order, worker process or resume point that reaches them."""
    return int(np.random.SeedSequence([k % 2**32 for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def rank_seed(seed: int) -> int:
    """`seed` in one process; under torchrun a seed of this rank's own, derived from (`seed`, rank)."""
    return seed if distributed.world_size() == 1 else derived_seed(seed, distributed.rank())


def derived_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded with `derived_seed(*keys)`."""
    return torch.Generator().manual_seed(derived_seed(*keys))


AMP_DTYPES = ("float16", "bfloat16")
_fast_paths = {"amp_dtype": torch.float16, "compile": False}  # this process's, set once by the scripts (`configure`)


def configure(amp_dtype: str = "float16", compile: bool = False) -> None:
    """This process's fast paths: the autocast dtype (`autocast`) and whether `prepare_model` compiles on CUDA."""
    if amp_dtype not in AMP_DTYPES:
        raise ToolkitError(f"unknown autocast dtype {amp_dtype!r}; choose from {', '.join(AMP_DTYPES)}")
    _fast_paths.update(amp_dtype=getattr(torch, amp_dtype), compile=compile)


def autocasts(device: torch.device, enabled: bool = True, amp_dtype: str | None = None) -> bool:
    """Whether `autocast` runs on `device` in `amp_dtype` (default: the configured one): on CUDA in either dtype, on
    the CPU in bfloat16 only, where it pays (a CPU with AVX-512 BF16 or AMX trains SmallField about 2× faster;
    float16 has no fast CPU kernels)."""
    dtype = _fast_paths["amp_dtype"] if amp_dtype is None else getattr(torch, amp_dtype)
    return enabled and (device.type == "cuda" or device.type == "cpu" and dtype is torch.bfloat16)


def autocast(device: torch.device, enabled: bool = True):
    """Autocast to the configured dtype where it runs (`autocasts`); otherwise a no-op, float32."""
    if autocasts(device, enabled):
        return torch.autocast(device.type, dtype=_fast_paths["amp_dtype"])
    return contextlib.nullcontext()


@contextlib.contextmanager
def float32(device: torch.device):
    """Plain float32 inside, whatever the caller's autocast: no autocast, and no TF32 in cuDNN's convolutions (10-bit
    mantissas), so a certified count is computed as precisely on a GPU as on the CPU."""
    cudnn = torch.backends.cudnn
    with torch.autocast(device.type, enabled=False), cudnn.flags(
            enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False):
        yield


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to the device, channels-last (cuDNN's and oneDNN's NHWC convolutions are faster: on a 2-core x86 CPU, fp32
    at 768×1024, 1.3 to 2.2× for certification passes and 1.06 to 1.9× for training steps, `benchmarks/throughput.py`),
    and on CUDA `torch.compile`d in place when configured (the module, its methods and its state_dict keys stay as
    they are)."""
    model = model.to(device).to(memory_format=torch.channels_last)
    if device.type == "cuda" and _fast_paths["compile"]:
        model.compile()
    return model

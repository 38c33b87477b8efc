"""Running under `torchrun`: one process per device, PyTorch's own process group (NCCL on CUDA, gloo on CPU).

Launched without torchrun (no WORLD_SIZE > 1 in the environment), every function here is the identity or a no-op,
so a script runs exactly as on one device. Under torchrun:

- `setup` joins the process group and gives each rank its device (cuda:LOCAL_RANK on CUDA);
- `shard` cuts a list of batches (e.g. the same-size batches of variable-size images) into this rank's share;
- `gather` collects per-rank results on every rank, `all_reduce_mean` averages a tensor across ranks;
- only rank 0 writes files (`utils.io.atomic_write` asks `is_main`), logs and shows progress bars;
- `solo` runs a block on this process alone (e.g. rank 0 training the cached victim while the others wait).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from utils.errors import ToolkitError

log = logging.getLogger(__name__)
T = TypeVar("T")
TIMEOUT = datetime.timedelta(hours=2)  # rank 0 may train the cached victim alone while the others wait
_solo = 0  # depth of `solo` blocks: inside one, this process acts as if it ran alone


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE) with several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialised() -> bool:
    """Whether this process has joined a process group."""
    return dist.is_available() and dist.is_initialized()


def active() -> bool:
    """Whether collectives run: a process group is up and no `solo` block is open."""
    return _solo == 0 and initialised()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank: the process group's, or before joining it the one torchrun gave (0 without torchrun)."""
    if initialised():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def is_main() -> bool:
    """Rank 0, the one process that writes files, logs and shows progress (True without torchrun)."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (once) and return this rank's device: `device` itself without torchrun;
    cuda:LOCAL_RANK for a CUDA device; the CPU otherwise."""
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ToolkitError(f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; start "
                               "torchrun with --nproc_per_node at most that")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ToolkitError(f"torchrun runs on CUDA (NCCL) or the CPU (gloo), not on {device.type}")
    if not initialised():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    return device


def teardown() -> None:
    if initialised():
        dist.destroy_process_group()


@contextlib.contextmanager
def solo() -> Iterator[None]:
    """Inside this block the library acts as if this process ran alone (no sharding, no collectives)."""
    global _solo
    _solo += 1
    try:
        yield
    finally:
        _solo -= 1


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block alone (`solo`) while the other ranks wait, then they run it: for work whose result is
    cached on disk (synthetic data, the default victim), so the others find it done."""
    if not active():
        yield
        return
    if not is_main():
        dist.barrier()
    try:
        with solo():
            yield
    finally:
        if is_main():
            dist.barrier()


def on_main(work: Callable[[], T]) -> T:
    """`work()` on rank 0, its result (or its `ToolkitError`, raised on every rank) passed to all ranks."""
    if not active():
        return work()
    box = [None, None]
    if is_main():
        try:
            box[0] = work()
        except ToolkitError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise ToolkitError(box[1])
    return box[0]


def shard(items: list[T], pad: bool = False) -> list[T]:
    """This rank's share of `items` (the same list on every rank): every world_size-th item from its rank. With
    `pad`, wrapped around so every rank gets the same number (training steps must match across ranks)."""
    n, r = world_size(), rank()
    if n == 1:
        return items
    if pad and items and len(items) % n:
        items = items + (items * n)[:n - len(items) % n]
    return items[r::n]


def gather(rows: list[T], key: Callable[[T], object] | None = None) -> list[T]:
    """Every rank's `rows` on every rank: concatenated rank by rank, or sorted by `key` (e.g. the image index, so
    the order is the one a single process gives)."""
    if active():
        parts: list = [None] * world_size()
        dist.all_gather_object(parts, rows)
        rows = [row for part in parts for row in part]
    return rows if key is None else sorted(rows, key=key)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over the ranks (in place, and returned)."""
    if active():
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def sync_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (e.g. batch-norm running statistics, which each rank updates from its own
    batches)."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 of the tensors' bytes, in order: equal digests mean bit-identical tensors."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_replicas(what: str, tensors: Iterable[torch.Tensor]) -> list[str]:
    """Check that every rank holds bit-identical `tensors` (model weights, the patch): the per-rank digests; a
    `ToolkitError` when they differ. Nothing to check (and no digest) without torchrun."""
    if not active():
        return []
    digests = gather([digest(tensors)])
    if len(set(digests)) > 1:
        raise ToolkitError(f"the ranks' {what} differ: sha256 {', '.join(d[:12] for d in digests)}")
    log.info(f"{what}: bit-identical on the {len(digests)} ranks (sha256 per rank: {' '.join(digests)})")
    return digests

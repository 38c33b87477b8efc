"""Atomic writes: a killed run never leaves a half-written checkpoint, JSON or CSV behind; one writer under torchrun."""
from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from utils import distributed
from utils.errors import ToolkitError

# mkstemp's files are private (0600); outputs get the mode any normal file gets, so read the umask (and restore it)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it over `path`. Under torchrun only
    rank 0 writes: the other ranks hold the same results and skip it."""
    path = Path(path)
    if not distributed.is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_json(path: str | Path, obj) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def load_json(path: str | Path):
    """A JSON file's content; one-line `ToolkitError` when it is missing or unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ToolkitError(f"{path} not found") from None
    except (OSError, ValueError) as e:
        raise ToolkitError(f"cannot read {path}: {e}") from None


def save_csv(path: str | Path, rows: Iterable[dict]) -> Path:
    rows = list(rows)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def save_checkpoint(path: str | Path, state: dict) -> Path:
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by `save_checkpoint`, read without unpickling arbitrary objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ToolkitError(f"checkpoint not found: {path}") from None
    except Exception as e:  # torch raises many types for corrupt or foreign files
        raise ToolkitError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ToolkitError(f"{path} is not a checkpoint of this toolkit (no state_dict)")
    return state


def plain(obj):
    """A structure made safe for JSON and `torch.load(weights_only=True)`: paths and other objects become strings."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj if obj is None or isinstance(obj, bool | int | float | str) else str(obj)

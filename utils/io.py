"""Atomic writes: a killed run never leaves a half-written checkpoint, JSON or CSV behind; one writer under torchrun."""
from __future__ import annotations

import csv
import json
import math
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
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


def finite(obj):
    """`obj` with every NaN or infinite number as None: JSON has no NaN, and null says that the number does not exist
    (e.g. the tight-MAE of a patch side where no image is certified). NumPy scalars become Python numbers."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def save_json(path: str | Path, obj) -> Path:
    """Strict JSON (no NaN or Infinity: those are written as null, see `finite`); other objects as their str."""
    text = json.dumps(finite(obj), indent=2, default=str, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


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


def torch_load(path: str | Path, what: str = "checkpoint") -> object:
    """A file written by `torch.save`, read with `weights_only` (tensors and plain containers; no pickled object is
    ever built, so no code in the file runs). Errors are one line naming the file, never torch's own text (which
    advises `weights_only=False`, i.e. running whatever the file holds); torch's warnings are silenced."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ToolkitError(f"{what} not found: {path}") from None
    except pickle.UnpicklingError as e:  # what torch's safe unpickler refuses: objects, or bytes it cannot parse
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise ToolkitError(f"{path} holds pickled Python objects ({found.group(1).rstrip('.')}), which are never "
                               "unpickled (that can run arbitrary code); save a plain state dict") from None
        raise ToolkitError(f"cannot read {what} {path}: corrupt, or not written by torch.save (pickled Python "
                           "objects are never unpickled: that can run arbitrary code)") from None
    except Exception as e:  # zipfile, pickle and torch raise many types for corrupt or foreign files
        lines = [line for line in str(e).strip().splitlines() if "weights_only" not in line]
        detail = re.sub(r"\x1b\[[0-9;]*m", "", lines[0]).split(". ")[0].strip() if lines else type(e).__name__
        raise ToolkitError(f"cannot read {what} {path}: {detail}") from None


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by `save_checkpoint`, read without unpickling arbitrary objects."""
    state = torch_load(path, "checkpoint")
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ToolkitError(f"{path} is not a checkpoint of this toolkit (no state_dict)")
    return state


def plain(obj):
    """A structure made safe for JSON and `torch.load(weights_only=True)`: paths and other objects become strings,
    NaN and infinities None (as `finite`)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj if obj is None or isinstance(obj, bool | int | float | str) else str(obj)

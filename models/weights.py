"""Weight files: the original releases (flat-name HDF5, `.pth`/`.pth.tar`) and the project's checkpoints."""
import functools
import re
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from models.counter import CrowdCounter
from utils.errors import ToolkitError
from utils.io import torch_load

# Prefixes some files use for the same module: DA-Net's source calls the network `fine`, its release `DA_Net`.
PREFIX_ALIASES = {"danet": {"fine.": "DA_Net."}}
# Entries of original files that are not network weights: CMTL's BCE class weights (a buffer in PyTorch 0.3).
IGNORED_KEYS = {"cmtl": {"loss_bce_fn.weight"}}
SHOWN = 3  # names listed per kind of mismatch before "… and N more"


class WrongModel(ToolkitError):
    """A weight file of another architecture of the registry: `holds` names it (e.g. "mcnn")."""

    def __init__(self, message: str, holds: str):
        super().__init__(message)
        self.holds = holds


def checkpoint_state(model: CrowdCounter) -> dict:
    """What a checkpoint must hold to rebuild the model: its name, build kwargs and `.net` state dict."""
    kwargs = dict(model.model_kwargs)
    if "level_width" in kwargs:  # training code may re-set CMTL's level width after build
        kwargs["level_width"] = float(model.level_width)
    return {"model": model.name, "model_kwargs": kwargs, "state_dict": model.net.state_dict()}


def _read_hdf5(path: Path) -> dict[str, Tensor]:
    """Every dataset by its full name; the originals store flat names such as `DME.branch1.0.conv.weight`."""
    state: dict[str, Tensor] = {}

    def keep(name: str, item: object) -> None:
        if isinstance(item, h5py.Dataset):
            state[name.replace("/", ".")] = torch.from_numpy(np.array(item))

    with h5py.File(path, "r") as f:
        f.visititems(keep)
    return state


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
PICKLE_MAGIC = b"\x80"  # older torch.save files and plain pickles start with the PROTO opcode


def read_weights_file(path: Path | str) -> object:
    """The content of an HDF5 file (name -> tensor) or of a torch file (loaded with weights_only); a release name
    (`models.releases`) reads its file once its digest is checked."""
    from models.releases import resolve

    path = resolve(path)
    if not path.is_file():
        raise ToolkitError(f"weights file not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ToolkitError(f"cannot read weights file {path}: {e.strerror}") from None
    if not head.startswith((HDF5_MAGIC, ZIP_MAGIC, PICKLE_MAGIC)):
        raise ToolkitError(f"{path} is not a weight file: neither HDF5 (.h5) nor a PyTorch file (.pt, .pth, .pth.tar)")
    if not head.startswith(HDF5_MAGIC):
        return torch_load(path, "weights file")  # one line, never advising to unpickle what it refuses
    try:
        return _read_hdf5(path)
    except Exception as e:  # h5py raises its own types for a broken file
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToolkitError(f"cannot read weights file {path}: {detail}") from None


def _state_dict(obj: object, source: str, name: str) -> dict[str, Tensor]:
    """The state dict in a file's content: plain, under `state_dict` (CSRNet/CAN releases, ours)."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), str) and obj["model"] != name:
        from models import MODEL_NAMES

        if obj["model"] in MODEL_NAMES:
            raise WrongModel(f"{source} is a {obj['model']} checkpoint, not {name}: use --model {obj['model']}",
                             obj["model"])
        raise ToolkitError(f"{source} is a {obj['model']} checkpoint, not {name}")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ToolkitError(f"{source} holds no state dict (a mapping of names to tensors)")
    return obj


def _canonical(state: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """Undo DataParallel's `module.` prefix and known renames; drop known non-weight entries."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        for old, new in PREFIX_ALIASES.get(name, {}).items():
            if key.startswith(old):
                key = new + key.removeprefix(old)
        if key not in IGNORED_KEYS.get(name, ()):
            out[key] = value
    return out


def _shape(shape: tuple) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _capped(items: list[str]) -> str:
    more = f" … and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


@functools.cache
def _architecture_keys(name: str) -> frozenset[str]:
    """The state-dict names of the registry model `name` as built by default (on the meta device: no memory, no
    initialisation)."""
    from models import _BUILDERS

    try:
        with torch.device("meta"):
            return frozenset(_BUILDERS[name]().net.state_dict())
    except Exception:  # a builder that needs real tensors: built on the CPU
        return frozenset(_BUILDERS[name]().net.state_dict())


def identify(state: dict[str, Tensor]) -> str | None:
    """The registry model whose parameter names a state dict holds exactly (after each model's known renames:
    `module.`, DA-Net's `fine.`, CMTL's loss buffer), if any: MCNN's `DME.`, CMTL's `CCN.`, DA-Net's `DA_Net.`,
    CSRNet's and CAN's frontend/backend layers, SmallField's features/head."""
    from models import MODEL_NAMES

    for name in MODEL_NAMES:
        if set(_canonical(state, name)) == _architecture_keys(name):
            return name
    return None


def _check_fits(state: dict[str, Tensor], net: nn.Module, source: str, name: str,
                raw: dict[str, Tensor] | None = None) -> None:
    """The file's names and shapes match `net` exactly; else one line: the architecture the file holds when it is
    another model of the registry (from `raw`, the names as stored), or a few of the names that differ."""
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if set(state) != set(want) and raw is not None:
        holds = identify(raw)
        if holds is not None and holds != name:
            from models import DISPLAY_NAMES

            raise WrongModel(f"{source} holds {DISPLAY_NAMES[holds]} weights, not {DISPLAY_NAMES[name]}'s: use "
                             f"--model {holds}", holds)
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = [f"{k} {_shape(s)}" for k, s in want.items() if k not in got]
    unexpected = [f"{k} {_shape(s)}" for k, s in got.items() if k not in want]
    wrong = [f"{k} (file {_shape(got[k])}, model {_shape(s)})" for k, s in want.items() if got.get(k, s) != s]
    problems = [f"{kind} {_capped(items)}" for kind, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
    if problems:
        raise ToolkitError(f"{source} does not fit {name}: " + "; ".join(problems))


def load_weights(model: CrowdCounter, path: str | Path) -> None:
    """Load a weight file into `model.net`, strictly: the names and shapes must match exactly."""
    load_state(model, read_weights_file(path), str(path))


def load_state(model: CrowdCounter, content: object, source: str) -> None:
    """Load the content of a weight file already read (checkpoint dict or state dict) into `model.net`.

    `source` names it in error messages.
    """
    raw = _state_dict(content, source, model.name)
    state = _canonical(raw, model.name)
    _check_fits(state, model.net, source, model.name, raw)
    check_finite(state, source)
    model.net.load_state_dict(state)


def check_finite(state: dict[str, Tensor], source: str) -> None:
    """Every floating-point tensor of a state dict is finite; else an error naming the file and the tensors."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ToolkitError(f"{source} holds non-finite weights (NaN or Inf) in {_capped(bad)}: a corrupt file or a "
                           "training run that diverged")


def copy_vgg16(convs: list[nn.Conv2d], path: str | Path) -> None:
    """Overwrite `convs` in order with the convs of a torchvision VGG-16 state-dict file (`features.N.*`).

    A conv with fewer input channels than VGG's takes VGG's leading ones (DA-Net's grey conv1_1: channel 0).
    """
    path = Path(path)
    state = read_weights_file(path)
    if not isinstance(state, dict):
        state = {}
    keys = [k for k in state if re.fullmatch(r"features\.\d+\.weight", k)]
    keys.sort(key=lambda k: int(k.split(".")[1]))
    if len(keys) < len(convs):
        raise ToolkitError(f"{path} is not a torchvision VGG-16 state dict (features.N.weight / .bias)")
    with torch.no_grad():
        for conv, key in zip(convs, keys, strict=False):
            weight, bias = state[key][:, :conv.in_channels], state.get(key.replace(".weight", ".bias"))
            if weight.shape != conv.weight.shape or bias is None or bias.shape != conv.bias.shape:
                raise ToolkitError(f"{path}: {key} {_shape(tuple(state[key].shape))} does not fit "
                                   f"the VGG-16 conv {_shape(tuple(conv.weight.shape))}")
            check_finite({key: weight, key.replace(".weight", ".bias"): bias}, str(path))
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)

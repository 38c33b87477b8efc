"""The five classic crowd-counting networks, and SmallField (built to be certified), behind one interface:
`build(name, weights=None, **kwargs)`."""
import inspect
from pathlib import Path

import torch

from models.can import build_can
from models.cmtl import build_cmtl
from models.counter import CrowdCounter
from models.csrnet import build_csrnet
from models.danet import build_danet
from models.mcnn import build_mcnn
from models.smallfield import build_smallfield
from models.weights import checkpoint_state, load_state, load_weights, read_weights_file
from utils.errors import ToolkitError

MODEL_NAMES = ("mcnn", "csrnet", "can", "cmtl", "danet", "smallfield")
DISPLAY_NAMES = {"mcnn": "MCNN", "csrnet": "CSRNet", "can": "CAN", "cmtl": "CMTL", "danet": "DA-Net",
                 "smallfield": "SmallField"}
_BUILDERS = {"mcnn": build_mcnn, "csrnet": build_csrnet, "can": build_can, "cmtl": build_cmtl,
             "danet": build_danet, "smallfield": build_smallfield}
_ALIASES = {"da-net": "danet", "da_net": "danet"}

__all__ = ["DISPLAY_NAMES", "MODEL_NAMES", "CrowdCounter", "build", "canonical_name", "checkpoint_state",
           "load_weights"]


def canonical_name(name: str) -> str:
    """The registry key of a model name: case-insensitive, with aliases (`DA-Net` -> `danet`)."""
    return _ALIASES.get(name.lower(), name.lower())


def build(name: str, weights: str | Path | None = None, seed: int | None = None, **kwargs) -> CrowdCounter:
    """A fresh model by name (case-insensitive), optionally loaded from a weight file or checkpoint.

    A checkpoint of these scripts rebuilds the model with the build options it records (e.g. SmallField's `width`);
    `kwargs` given here take precedence. `seed`: the initial weights are those `torch.manual_seed(seed)` gives,
    drawn inside `fork_rng` so the caller's global RNG is neither read nor moved (PyTorch's layers offer no generator
    argument; nothing else in the toolkit draws from the global RNG). kwargs: csrnet `upsample`, `vgg_weights`; can
    and danet `vgg_weights`; cmtl `level_width`; smallfield `width`, `blocks`, `norm`.
    """
    key = canonical_name(name)
    if key not in _BUILDERS:
        raise ToolkitError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    content = None if weights is None else read_weights_file(weights)
    if isinstance(content, dict) and content.get("model") == key and isinstance(content.get("model_kwargs"), dict):
        kwargs = {**content["model_kwargs"], **kwargs}  # a checkpoint of ours rebuilds the model it was trained as
    options = inspect.signature(_BUILDERS[key]).parameters
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ToolkitError(f"{key} has no option {', '.join(unknown)}; "
                           f"its options: {', '.join(options) or 'none'}")
    if seed is None:
        model = _BUILDERS[key](**kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _BUILDERS[key](**kwargs)
    if content is not None:
        load_state(model, content, str(weights))
    return model

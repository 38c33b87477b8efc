"""Weights this project trained and releases, in `weights/` (listed in `weights/releases.json`, provenance in
`weights/README.md`): a name such as `smallfield-B` stands for the file in every script, and the file and its
calibration are checked against their SHA-256 digests whenever they are read."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from utils.errors import ToolkitError

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
MANIFEST = WEIGHTS_DIR / "releases.json"
DEFAULT = "smallfield-B"  # what count.py counts with when no --weights is given


@dataclass(frozen=True)
class Release:
    name: str
    model: str
    weights: Path
    weights_sha256: str
    calibration: Path
    calibration_sha256: str


def releases() -> dict[str, Release]:
    """Every release of the manifest, by name."""
    if not MANIFEST.is_file():
        return {}
    entries = json.loads(MANIFEST.read_text())
    return {name: Release(name, e["model"], WEIGHTS_DIR / e["weights"], e["weights_sha256"],
                          WEIGHTS_DIR / e["calibration"], e["calibration_sha256"]) for name, e in entries.items()}


def find(weights: str | Path | None) -> Release | None:
    """The release `weights` names (a bare name, not a path to a file), else None."""
    if weights is None or Path(weights).exists() or len(Path(weights).parts) != 1:
        return None
    return releases().get(str(weights))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified(path: Path, digest: str, what: str) -> Path:
    """`path`, once its content matches `digest`; else one error line saying so."""
    if not path.is_file():
        raise ToolkitError(f"{what} is missing: {path} (a clone of the repository holds it)")
    if sha256(path) != digest:
        raise ToolkitError(f"{path} does not match the SHA-256 digest of {what} in {MANIFEST.name}: a corrupt or "
                           "replaced file; restore it with `git checkout -- weights/`")
    return path


def resolve(weights: str | Path) -> Path:
    """The file `weights` stands for: a release's, digest-checked, or the path itself."""
    found = find(weights)
    if found is None:
        return Path(weights)
    return verified(found.weights, found.weights_sha256, f"the weights of release {found.name}")


def calibration(found: Release) -> Path:
    """A release's calibration file, digest-checked."""
    return verified(found.calibration, found.calibration_sha256, f"the calibration of release {found.name}")


def publish(name: str, checkpoint: str | Path, calibration_file: str | Path) -> Release:
    """Write a release: the weights of a run checkpoint (model, build kwargs and state dict only: no optimiser, no
    history) and its calibration into `WEIGHTS_DIR`, their digests into the manifest, replacing a release of that
    name and the figures recorded for it (`mini`, `test`: record them again). The weights file is rewritten only if
    its tensors differ, so a new calibration keeps the weights' digest. From a shell:
    `python -c "from models.releases import publish; publish(NAME, CHECKPOINT, CALIBRATION)"`."""
    import shutil

    import torch

    from models import build
    from models.weights import checkpoint_state
    from utils.io import atomic_write, load_checkpoint, save_json

    state = load_checkpoint(checkpoint)
    model = build(state["model"], checkpoint)
    weights, calibration_copy = WEIGHTS_DIR / f"{name}.pt", WEIGHTS_DIR / f"{name}.calibration.json"
    state_now = checkpoint_state(model)
    if not _holds(weights, state_now):  # a new calibration of the same weights keeps the file and its digest
        atomic_write(weights, lambda tmp: torch.save(state_now, tmp))
    atomic_write(calibration_copy, lambda tmp: shutil.copyfile(calibration_file, tmp))
    entries = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}
    entries[name] = {"model": state["model"], "weights": weights.name, "weights_sha256": sha256(weights),
                     "calibration": calibration_copy.name, "calibration_sha256": sha256(calibration_copy)}
    save_json(MANIFEST, dict(sorted(entries.items())))
    return releases()[name]


def _holds(path: Path, state: dict) -> bool:
    """Whether the weights file `path` exists and holds exactly `state` (model, options and tensors)."""
    import torch

    from utils.io import torch_load

    try:
        old = torch_load(path, "weights file") if path.is_file() else None
    except ToolkitError:  # unreadable: rewritten
        return False
    if not isinstance(old, dict) or not isinstance(old.get("state_dict"), dict):
        return False
    return (old.get("model"), old.get("model_kwargs")) == (state["model"], state["model_kwargs"]) and \
        old["state_dict"].keys() == state["state_dict"].keys() and \
        all(torch.equal(old["state_dict"][k], v) for k, v in state["state_dict"].items())

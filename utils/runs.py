"""Run folders: a new run never lands on an earlier one, a resumed run keeps the settings it recorded, `--out` is
checked before any long work (`check_out`), and a run that fails or is interrupted leaves nothing behind unless it
holds a resumable checkpoint (`discard_failed`).

A run folder holds `args.json`: the run's settings as resolved (device, data folders, patch side, ...), the
libraries and git commit it ran with, and one entry per resume.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
from pathlib import Path

from utils import distributed
from utils.errors import ToolkitError
from utils.io import load_checkpoint, load_json, plain, save_json

RECORD = "args.json"
# Where and how a run executes, not what it computes: these may differ when a run is resumed.
RUN_CONTROL = frozenset({"out", "resume", "overwrite", "device", "workers", "figure_format", "compile"})
# Recorded settings a resumed run may still change when the flag is given: `--no-test` (a run that would score the
# test split may stop short of it; one that would not keeps it unscored: evaluate.py scores a chosen checkpoint)
MAY_CHANGE_ON_RESUME = frozenset({"score_test"})
# Settings a run recorded before the flag existed had this value: such a run resumes as it started
# what a run recorded before each flag existed meant: no validation part, no count term, uniform crops, the default
# SmallField
BEFORE_THE_FLAG = {"val": 0.0, "count_loss": 0.0, "dense_crops": 0.0, "width": None, "blocks": None, "norm": True,
                   "ema": 0.0, "scales": None}
REPO = Path(__file__).resolve().parents[1]

_current: dict | None = None  # the run folder this process works in: {"out", "created", "resumed"}
command: str | None = None  # the command line, when a script runs through `utils.cli.run`


def begin(line: str) -> None:
    """A script starts: record its command line, and forget any run folder an earlier call in this process used."""
    global _current, command
    _current, command = None, line


def settings(args: argparse.Namespace) -> dict:
    """The run's settings as plain JSON values (private attributes such as the given-flag set left out)."""
    return {k: plain(v) for k, v in vars(args).items() if not k.startswith("_")}


def read_record(out: Path) -> dict:
    path = out / RECORD
    if not path.exists():
        raise ToolkitError(f"{out} holds no {RECORD}: not a run folder of this toolkit")
    record = load_json(path)
    if not isinstance(record, dict):
        raise ToolkitError(f"{path} does not hold a run's settings")
    return record


def _flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len) if action.option_strings else action.dest


def _restore(action: argparse.Action, value):
    """A recorded JSON value back in the flag's type (paths were recorded as strings)."""
    if value is None or action.type is None:
        return value
    convert = (lambda v: action.type(v) if isinstance(v, str) else v)  # noqa: E731
    return [convert(v) for v in value] if isinstance(value, list) else convert(value)


def _same(a, b) -> bool:
    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve() == b.resolve()
    return a == b


def recorded_args(parser: argparse.ArgumentParser, record: dict, **changes) -> argparse.Namespace:
    """The arguments a run recorded (its args.json) as the parser would give them, with `changes` (e.g. another
    out); flags the record lacks take their defaults."""
    args = argparse.Namespace(**{a.dest: _restore(a, record[a.dest]) if a.dest in record else a.default
                                 for a in parser._actions if a.default is not argparse.SUPPRESS})
    vars(args).update(changes)
    return args


def resumed_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """`args` with every setting taken from the run in `args.out`: from its checkpoint (last.pt), or for a script
    whose parser says `resume_from = "args.json"` (one that resumes from results saved as it goes, not from a
    checkpoint) from its record; a flag given on the command line that contradicts the recorded value is an error,
    except a larger `--epochs`, which extends it, `--no-test` (`MAY_CHANGE_ON_RESUME`), and a repeatable flag (e.g.
    compare_defenses.py's --row), whose new values are added to the recorded ones."""
    source = getattr(parser, "resume_from", "last.pt")
    if args.out is None:
        raise ToolkitError(f"--resume needs --out, the run folder holding {source}")
    if getattr(args, "overwrite", False):
        raise ToolkitError("--resume continues the run in --out, --overwrite starts it again: give one of them")
    if not (args.out / source).is_file():
        raise ToolkitError(f"nothing to resume: {args.out / source} does not exist")
    recorded = read_record(args.out) if source == RECORD else load_checkpoint(args.out / source).get("args", {})
    given = getattr(args, "_given", frozenset())
    merged = argparse.Namespace(**vars(args))
    for action in parser._actions:
        dest = action.dest
        if dest in RUN_CONTROL or (dest not in recorded and dest not in BEFORE_THE_FLAG):
            continue
        old = _restore(action, recorded[dest]) if dest in recorded else BEFORE_THE_FLAG[dest]
        new = getattr(args, dest)
        if dest not in given or _same(new, old):
            setattr(merged, dest, old)
        elif isinstance(action, argparse._AppendAction):  # e.g. more rows of a comparison
            if old is None:
                raise ToolkitError(f"{_flag(action)} adds to what the run being resumed recorded, and it recorded "
                                   f"none ({args.out / source}): start a new run with every {_flag(action)} it needs")
            setattr(merged, dest, old + [v for v in new if v not in old])
        elif dest in MAY_CHANGE_ON_RESUME:
            setattr(merged, dest, new)
        elif not (dest == "epochs" and new > old):
            raise ToolkitError(f"{_flag(action)} {new} contradicts the run being resumed ({_flag(action)} {old} in "
                               f"{args.out / source}); leave it out to continue that run, or start a new one "
                               "elsewhere")
    return merged


def environment() -> dict:
    """Library versions, interpreter, host and git commit of this process."""
    import numpy
    import torch
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "host": platform.node(), "git_commit": git_commit(),
            "command": command}


def git_commit() -> str | None:
    """The repository's HEAD, with `+dirty` when tracked files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first)."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    for p in missing:
        try:
            p.mkdir()
        except FileExistsError:
            if not p.is_dir():
                raise ToolkitError(f"cannot create the run folder {path}: {p} is a file") from None
        except OSError as e:
            raise ToolkitError(f"cannot create the run folder {path}: {e.strerror}") from None
    return missing


def _new_default(parent: Path) -> tuple[Path, list[Path]]:
    """A fresh runs/<script>/<timestamp>[-n] folder: never one that another run already took."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    created = _make_dirs(parent)
    for n in range(1000):
        out = parent / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            out.mkdir()
        except FileExistsError:
            continue
        return out, [*created, out]
    raise ToolkitError(f"cannot find a free run folder name under {parent}")


def _check_creatable(path: Path, target: str | None = None) -> None:
    """The folder `path` (existing or not) can be created and written to: no file among its parents, and the nearest
    existing folder writable. Nothing is created. `target` names what is to be written (default: the run folder)."""
    target = target or f"the run folder {path}"
    for p in path.parents:
        if p.exists() and not p.is_dir():
            raise ToolkitError(f"cannot create {target}: {p} is a file")
    folder = next((p for p in (path, *path.parents) if p.is_dir()), Path("."))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ToolkitError(f"cannot create {target}: {folder} is not writable")


def _check_claimable(out: Path, overwrite: bool, resumable: bool) -> bool:
    """What `_claim` refuses, checked without changing anything; True if `out` holds an earlier run to delete."""
    if out.exists() and not out.is_dir():
        raise ToolkitError(f"--out {out} is a file, not a folder")
    _check_creatable(out)
    if not (out.is_dir() and any(out.iterdir())):
        return False
    if not (out / RECORD).is_file():
        raise ToolkitError(f"--out {out} is a folder that is not empty and holds no run ({RECORD}); choose a new "
                           "or empty folder")
    if not overwrite:
        offer = "--resume continues it, --overwrite starts it again (deleting its files); or" if resumable else \
            "--overwrite starts it again (deleting its files), or"
        raise ToolkitError(f"{out} already holds a run: {offer} choose another --out")
    return True


def check_out(args: argparse.Namespace, script: str) -> None:
    """Everything `start` would refuse about the run folder (`args.out`: a file, a folder holding other files, an
    earlier run without --overwrite, a parent that is a file or not writable; with --resume, a folder that is not
    a run), checked without creating, deleting or writing anything: call it before any long work. Under torchrun
    only rank 0 checks: it alone claims the folder (`start`), and another rank checking after that claim (nothing
    keeps the ranks in step between two scripts of one launch) would refuse the folder just claimed."""
    if not distributed.is_main():
        return
    if getattr(args, "resume", False):
        read_record(args.out)
        _check_creatable(args.out)
    elif args.out is None:
        _check_creatable(Path("runs") / script)
    else:
        _check_claimable(args.out, bool(getattr(args, "overwrite", False)), hasattr(args, "resume"))


def _claim(out: Path, overwrite: bool, resumable: bool = True) -> list[Path]:
    """Make `out` ready for a new run: new, empty, or (with `overwrite`) an earlier run emptied. `resumable`: the
    script has --resume (the refusal offers it)."""
    if _check_claimable(out, overwrite, resumable):
        print(f"--overwrite: deleting the earlier run in {out}")
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    return _make_dirs(out)


def start(args: argparse.Namespace, script: str, extra: dict | None = None) -> Path:
    """Claim the run folder (`args.out`, default a new runs/<script>/<timestamp>) and write its args.json: the
    settings as resolved, `extra` resolved values, and the environment; a resume appends to the record. Under
    torchrun rank 0 claims it and the other ranks learn where it is."""
    args.out = distributed.on_main(lambda: _start(args, script, extra))
    return args.out


def _start(args: argparse.Namespace, script: str, extra: dict | None) -> Path:
    global _current
    resume = bool(getattr(args, "resume", False))
    if resume:
        previous = read_record(args.out)
        created = []
    elif args.out is None:
        args.out, created = _new_default(Path("runs") / script)
    else:
        created = _claim(args.out, bool(getattr(args, "overwrite", False)), hasattr(args, "resume"))
    _current = {"out": args.out, "created": created, "resumed": resume}
    now = datetime.datetime.now().isoformat(timespec="seconds")
    record = {"script": script, **settings(args), **(extra or {})}
    if resume:
        resumes = previous.get("resumes", []) + [{"time": now, "epochs": getattr(args, "epochs", None),
                                                   "environment": environment()}]
        record.update(started=previous.get("started"), environment=previous.get("environment"), resumes=resumes)
    else:
        record.update(started=now, environment=environment())
    save_json(args.out / RECORD, record)
    return args.out


def claim_file(path: Path, suffixes: tuple[str, ...], overwrite: bool = False) -> Path:
    """Check that a single output file can be written at `path`: a known suffix, not a folder, and not an existing
    file unless `overwrite`. The parent folder is created when the file is written."""
    if path.is_dir():
        raise ToolkitError(f"--out {path} is a folder; give a file name ending in {' or '.join(suffixes)}")
    if path.suffix.lower() not in suffixes:
        raise ToolkitError(f"--out {path}: the file name must end in {' or '.join(suffixes)}")
    if path.exists() and not overwrite:
        raise ToolkitError(f"{path} already exists; add --overwrite to replace it")
    if any(p.exists() and not p.is_dir() for p in path.parents):
        raise ToolkitError(f"--out {path}: a parent of it is a file")
    _check_creatable(path.parent, str(path))
    return path


def discard_failed() -> bool:
    """A run that failed or was interrupted leaves nothing: delete the run folder this process claimed (every file
    in it is this run's: a folder that held an earlier run was emptied by --overwrite) and the parent folders created
    for it; a folder that existed before is left empty. Kept: a resumed run (its files are an earlier run's) and a
    run holding work to resume or reuse (`resumable`). True if it deleted the run."""
    global _current
    run, _current = _current, None
    if run is None or run["resumed"] or not run["out"].is_dir():
        return False
    out = run["out"]
    if resumable(out):
        return False
    for child in out.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for folder in reversed(run["created"]):
        try:
            folder.rmdir()
        except OSError:  # not empty: something else lives there
            break
    return True


discard_unstarted = discard_failed  # its former name


def resumable(out: Path) -> bool:
    """`out` holds work that `--resume` continues: a checkpoint (last.pt, also in a subfolder) or results saved as
    they were made (rows/*.json, as compare_defenses.py saves each row of its table)."""
    return any(p.is_file() for pattern in ("**/last.pt", "rows/*.json") for p in out.glob(pattern))


def current() -> Path | None:
    """The run folder this process works in, if any."""
    return None if _current is None else _current["out"]

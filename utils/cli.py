"""Argument groups shared by the scripts, the run folder, and the error-to-one-line wrapper around `main`."""
from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable
from pathlib import Path

from datasets.crowd import DENSITY_SOURCES
from utils.errors import ToolkitError
from utils.io import save_json

FIGURE_FORMATS = ("png", "pdf", "svg")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends each valued flag's default (unless it is None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, argparse.SUPPRESS) or action.nargs == 0 \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`prog: error: ...`) and exit status 2, like every other error;
    defaults shown in --help; no prefix abbreviations (a resumed run must know exactly which flags were given)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_model_args(parser: argparse.ArgumentParser, default: str = "mcnn") -> None:
    from models import MODEL_NAMES, canonical_name

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default, type=canonical_name, choices=MODEL_NAMES, help="architecture")
    group.add_argument("--weights", type=Path, help="original weight file (.h5/.pth/.pth.tar) or a checkpoint of ours")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (ShanghaiTech layout; the cached synthetic set when none is given)")
    group.add_argument("--data", type=Path, help="a root holding train_data/ and test_data/")
    group.add_argument("--train-data", type=Path, help="a split folder with images/ and ground_truth/")
    group.add_argument("--test-data", type=Path, help="a split folder with images/ and ground_truth/")
    group.add_argument("--density", default="adaptive", choices=DENSITY_SOURCES,
                       help="target density: geometry-adaptive or MCNN's fixed kernel from the points, "
                            "or the CSRNet .h5 files beside them")
    group.add_argument("--max-train-images", type=positive_int, help="use only the first N training images")
    group.add_argument("--max-test-images", type=positive_int, help="use only the first N test images")


def add_training_args(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """The optimisation flags of every training script (`defaults`: epochs, batch_size, crop, lr)."""
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, default=defaults["epochs"])
    group.add_argument("--batch-size", type=positive_int, default=defaults["batch_size"])
    group.add_argument("--crop", type=positive_int, default=defaults["crop"], help="side of the random crops")
    group.add_argument("--lr", type=positive_float, default=defaults["lr"], help="Adam's rate, cosine-annealed")
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--resume", action="store_true", help="continue from <out>/last.pt (needs --out)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out", type=Path, help="run folder (default: a new runs/<script>/<timestamp>); an existing "
                       "run there is never overwritten without --overwrite")
    group.add_argument("--overwrite", action="store_true", help="start the run in --out again, deleting its files")
    group.add_argument("--figure-format", default="png", choices=FIGURE_FORMATS, help="file format of the figures")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    group.add_argument("--no-amp", dest="amp", action="store_false", help="disable float16 autocast on CUDA")


def synthetic_splits() -> tuple[Path, Path]:
    """(train, test) splits of the cached synthetic crowd set, generated on first use."""
    from datasets.synthetic import ensure_synthetic

    root = ensure_synthetic()
    print(f"no data given: using the synthetic crowd set at {root}")
    return root / "train_data", root / "test_data"


def check_split(split: Path) -> Path:
    if not split.is_dir():
        raise ToolkitError(f"data split not found: {split}")
    return split


def resolve_splits(data: Path | None, train: Path | None = None,
                   test: Path | None = None) -> tuple[Path | None, Path | None]:
    """(train split, test split): explicit folders, else `data`'s train_data/test_data, else synthetic crowds."""
    if data is not None:
        train = train or data / "train_data"
        test = test or data / "test_data"
    if train is None and test is None:
        return synthetic_splits()
    return tuple(None if split is None else check_split(split) for split in (train, test))


def run_dir(args: argparse.Namespace, script: str) -> Path:
    """Create the run folder (`--out` or runs/<script>/<timestamp>) and record the arguments in it."""
    if args.out is None:
        args.out = Path("runs") / script / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    save_json(args.out / "args.json", vars(args))
    return args.out


def run(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
        argv: list[str] | None = None) -> None:
    """Parse and call `main`; a `ToolkitError` becomes one line on stderr and exit status 2."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except ToolkitError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        sys.exit(130)

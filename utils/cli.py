"""Argument groups shared by the scripts, the run folder, and the error-to-one-line wrapper around `main`."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from datasets.crowd import DENSITY_SOURCES, CrowdDataset
from datasets.synthetic import ensure_synthetic
from models import MODEL_NAMES, build, canonical_name, releases
from models.smallfield import deepened
from utils import distributed, runs
from utils.ablation import FILL, KEEP, UNITS, AblationSpec
from utils.errors import ToolkitError
from utils.patch import PLACEMENTS, SHAPES, PatchSpec, PatchTransform
from utils.plots import FORMATS as FIGURE_FORMATS
from utils.runtime import AMP_DTYPES, autocasts, close_progress, configure, pick_device
from utils.training import VALIDATION

_UNSET = object()


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
        # the calling script's file name, also when its main runs in-process (tests) rather than as sys.argv[0]
        kwargs.setdefault("prog", Path(sys._getframe(1).f_globals.get("__file__", sys.argv[0])).name)
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        """Parsed flags, with `_given` (the dests set on the command line); with `--resume`, the settings of the
        run being resumed, checked against the flags given."""
        parsed = super().parse_args(args, namespace)
        # argparse leaves an attribute that is already set alone when its flag is absent: mark them all as unset
        # (an appending flag copies the list it finds, so an empty list of its own marks it unset)
        unset = {a.dest: [] if isinstance(a, argparse._AppendAction) else _UNSET for a in self._actions
                 if a.dest != argparse.SUPPRESS}
        probe = argparse.Namespace(**unset)
        super().parse_known_args(args, probe)
        parsed._given = frozenset(k for k, v in vars(probe).items() if v is not unset.get(k, _UNSET))
        _model_of_release(self, parsed)
        if getattr(parsed, "resume", False):
            try:
                parsed = runs.resumed_settings(self, parsed)
            except ToolkitError as e:
                self.error(str(e))
        return parsed


def _model_of_release(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--weights naming a release (`models.releases`) sets --model to the release's; a --model given against it is a
    usage error."""
    found = releases.find(getattr(args, "weights", None))
    if found is None or not hasattr(args, "model"):
        return
    if "model" in args._given and args.model != found.model:
        parser.error(f"--weights {found.name} is a {found.model} release, not {args.model}: leave --model out")
    args.model = found.model


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def unit_interval(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def below_one(text: str) -> float:
    """A share or decay in [0, 1) (e.g. --val, --ema; 0: none)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text}")
    return value


class OrderedPair(argparse.Action):
    """`nargs=2` values MIN MAX: a usage error when MIN > MAX."""

    def __call__(self, parser, namespace, values, option_string=None):
        low, high = values
        if low > high:
            parser.error(f"argument {option_string}: MIN must not exceed MAX, got {low} {high}")
        setattr(namespace, self.dest, list(values))


def add_model_args(parser: argparse.ArgumentParser, default: str = "mcnn",
                   omitted: str = "a randomly initialised model") -> argparse._ArgumentGroup:
    """The "model" group: --model and --weights (`omitted`: what the script uses when --weights is not given)."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default, type=canonical_name, choices=MODEL_NAMES,
                       help="network architecture (case-insensitive)")
    group.add_argument("--weights", type=Path,
                       help="weights to load: a release of this project by name (" + (", ".join(releases.releases())
                            or "none yet") + "; it sets --model), an original release file (.h5, .pth, .pth.tar; "
                            "e.g. path/to/mcnn_shtechA_660.h5) or a checkpoint written by these scripts (e.g. "
                            f"runs/train/<run>/best.pt); omitted: {omitted}")
    return group


SYNTHETIC = "the cached synthetic crowd set (generated on first use)"


def add_data_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "data" group of the scripts that need both a train and a test split."""
    group = parser.add_argument_group("data (ShanghaiTech layout)")
    group.add_argument("--data", type=Path,
                       help="dataset ROOT holding train_data/ and test_data/ (each with images/ and ground_truth/), "
                            "e.g. ShanghaiTech/part_A_final; with none of --data, --train-data, --test-data: "
                            f"{SYNTHETIC}")
    group.add_argument("--train-data", type=Path,
                       help="ONE split folder holding images/ and ground_truth/, e.g. "
                            "ShanghaiTech/part_A_final/train_data; overrides --data's train_data/")
    group.add_argument("--test-data", type=Path,
                       help="ONE split folder holding images/ and ground_truth/, e.g. "
                            "ShanghaiTech/part_A_final/test_data; overrides --data's test_data/")
    group.add_argument("--density", default="adaptive", choices=DENSITY_SOURCES,
                       help="target density maps: made from the head points with the geometry-adaptive kernel "
                            "(adaptive) or MCNN's fixed σ = 4 kernel (fixed), or read from the CSRNet-style "
                            "ground_truth/IMG_<i>.h5 files and scaled to the number of heads (h5; see make_dataset.py "
                            "densities); the ground-truth counts always come from the head points")
    group.add_argument("--max-train-images", type=positive_int, help="use only the first N training images")
    group.add_argument("--max-test-images", type=positive_int, help="use only the first N test images")
    return group


def add_split_args(parser: argparse.ArgumentParser, verb: str) -> argparse._ArgumentGroup:
    """The "data" group of the scripts that read one split: --data (a split, not a root) and --max-images."""
    group = parser.add_argument_group("data (ShanghaiTech layout)")
    group.add_argument("--data", type=Path,
                       help="ONE split folder holding images/ and ground_truth/, e.g. "
                            "ShanghaiTech/part_A_final/test_data (not the dataset root); omitted: the test_data/ "
                            f"split of {SYNTHETIC}")
    group.add_argument("--max-images", type=positive_int, help=f"{verb} only the first N images")
    return group


def add_training_args(parser: argparse.ArgumentParser, defaults: dict) -> argparse._ArgumentGroup:
    """The optimisation flags of every training script (`defaults`: epochs, batch_size, crop, lr); returns the
    "training" group so a script can add its own training flags to it."""
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, default=defaults["epochs"],
                       help="passes over the training split")
    group.add_argument("--batch-size", type=positive_int, default=defaults["batch_size"],
                       help="training crops per optimiser step")
    group.add_argument("--crop", type=positive_int, default=defaults["crop"],
                       help="side of the random square training crops, in pixels")
    group.add_argument("--lr", type=positive_float, default=defaults["lr"],
                       help="Adam's learning rate, cosine-annealed to 0 over --epochs")
    group.add_argument("--weight-decay", type=float, default=0.0, help="Adam's L2 weight decay")
    group.add_argument("--val", type=below_one, default=VALIDATION,
                       help="share of the train split held out (a draw of --seed, listed in args.json) to validate "
                            "every epoch and choose best.pt; the test split is evaluated once, with the checkpoint "
                            "chosen; 0: no validation part, last.pt is kept")
    group.add_argument("--no-test", dest="score_test", action="store_false",
                       help="leave the test split unscored at the end (a candidate to be compared with others on the "
                            "validation part first; evaluate.py or certify.py scores the one chosen)")
    group.add_argument("--resume", action="store_true", help="continue from <out>/last.pt (needs --out)")
    return group


def add_run_args(parser: argparse.ArgumentParser, omitted: str = "a new runs/<script>/<timestamp>"
                 ) -> argparse._ArgumentGroup:
    """The "run" group: output folder (`omitted`: what the script does without --out), figures, device, seed,
    workers, mixed precision. `run` checks a given --out before the script's main starts (`runs.check_out`)."""
    parser.run_folder = True
    group = parser.add_argument_group("run")
    group.add_argument("--out", type=Path, help=f"run folder; omitted: {omitted}; an existing run there is never "
                       "overwritten without --overwrite")
    group.add_argument("--overwrite", action="store_true", help="start the run in --out again, deleting its files")
    group.add_argument("--figure-format", default="png", choices=FIGURE_FORMATS, help="file format of the figures")
    group.add_argument("--device", default="auto",
                       help="cpu, cuda, cuda:N or mps; auto takes CUDA, then MPS, then the CPU")
    group.add_argument("--seed", type=int, default=0, help="seed of every random draw (crops, patches, ablations)")
    group.add_argument("--workers", type=non_negative_int, default=0,
                       help="data-loading worker processes (0: in the main process)")
    group.add_argument("--no-amp", dest="amp", action="store_false", help="disable autocast (run in float32)")
    group.add_argument("--amp-dtype", default="float16", choices=AMP_DTYPES,
                       help="autocast dtype: float16 runs on CUDA only; bfloat16 on an Ampere or newer card, and on "
                            "the CPU, where it is about 2x faster on one with AVX-512 BF16 or AMX")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model on CUDA (the first batches of each image size are slow)")
    return group


def add_patch_args(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup | None = None,
                   placement: bool = True) -> argparse._ArgumentGroup:
    """The patch's shape, random transform ranges and (with `placement`) where it goes: with its side, a `PatchSpec`
    (`patch_spec`). Added to `group`, else to a new "patch" group."""
    group = group or parser.add_argument_group("patch")
    group.add_argument("--patch-shape", default="circle", choices=SHAPES, help="mask of the patch")
    group.add_argument("--rotation", type=float, default=PatchTransform.rotation,
                       help="each application rotates the patch by a random angle in ±this, in degrees")
    group.add_argument("--scale", type=positive_float, nargs=2, metavar=("MIN", "MAX"), action=OrderedPair,
                       default=[PatchTransform.scale_min, PatchTransform.scale_max],
                       help="each application scales the patch by a random factor in [MIN, MAX]")
    group.add_argument("--brightness", type=float, default=PatchTransform.brightness,
                       help="each application adds a random brightness shift in ±this, in [0, 1] pixel units")
    if placement:
        group.add_argument("--placement", default="center", choices=PLACEMENTS[:2],
                           help="where the patch goes while it is optimised: the image centre, or a random "
                                "position per image")
    return group


def patch_spec(args: argparse.Namespace, side: int) -> PatchSpec:
    """The `PatchSpec` the patch flags of `add_patch_args` describe, for a patch of `side` pixels."""
    return PatchSpec(side, args.patch_shape, PatchTransform(args.rotation, *args.scale, args.brightness),
                     getattr(args, "placement", "center"))


def add_ablation_args(parser: argparse.ArgumentParser, trained: bool, keep: int = KEEP) -> argparse._ArgumentGroup:
    """--keep, --unit, --fill: the `AblationSpec` to train with, or (not `trained`) overrides of the one the model's
    checkpoint records (`ablation_spec`), with `keep` the default of a model that records none."""
    group = parser.add_argument_group("ablation" if trained else "ablation (default: what the checkpoint records)")
    default = {"keep": keep, "unit": "element", "fill": FILL} if trained else {"keep": None, "unit": None, "fill": None}
    otherwise = "" if trained else "; omitted: the checkpoint's, else "
    group.add_argument("--keep", type=positive_int, default=default["keep"],
                       help="units kept per whole image (k)" + (otherwise and f"{otherwise}{keep}"))
    group.add_argument("--unit", choices=UNITS, default=default["unit"],
                       help="element: one of the 3·H·W values; pixel: one pixel, its 3 channels together"
                            + (otherwise and f"{otherwise}element"))
    group.add_argument("--fill", type=unit_interval, default=default["fill"],
                       help="value of the ablated units, in [0, 1] pixel units" + (otherwise and f"{otherwise}{FILL}"))
    return group


def ablation_spec(args: argparse.Namespace, trained: AblationSpec | None, keep: int = KEEP) -> AblationSpec:
    """The spec a model was trained with (`trained`; without one, `keep` and the default unit and fill), with each of
    --keep, --unit, --fill that was given in its place; an override of a trained value is said."""
    spec = trained or AblationSpec(keep)
    for name in ("keep", "unit", "fill"):
        value = getattr(args, name)
        if value is None:
            continue
        if trained is not None and value != getattr(trained, name):
            print(f"warning: --{name} {value} overrides the {name} {getattr(trained, name)} the model was trained "
                  "with", file=sys.stderr)
        spec = dataclasses.replace(spec, **{name: value})
    return spec


def synthetic_splits() -> tuple[Path, Path]:
    """(train, test) splits of the cached synthetic crowd set, generated on first use."""
    with distributed.main_first():
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


def training_setup(args: argparse.Namespace, script: str, erase: float = 0.0, dense: float = 0.0,
                   scales: tuple[float, float] | None = None
                   ) -> tuple[Path, torch.device, torch.nn.Module, CrowdDataset, CrowdDataset | None, CrowdDataset]:
    """What every training script does first: the run folder checked, device, model, the train split's crops and
    its held-out validation part (`--val`, drawn by `--seed`), the test split, then the run folder claimed (only once
    the inputs are known to be good), with the validation images recorded in args.json."""
    runs.check_out(args, script)
    train_root, test_root = resolve_splits(args.data, args.train_data, args.test_data)
    if train_root is None or test_root is None:
        raise ToolkitError("training needs both a train and a test split (--data, or --train-data and --test-data)")
    device = pick_device(args.device)
    options = {k: getattr(args, k) for k in ("width", "blocks") if getattr(args, k, None)}  # train.py's
    if not getattr(args, "norm", True):
        options["norm"] = False
    grow = options.pop("blocks", None) if args.weights is not None else None
    if options and args.weights is not None:
        flags = ", ".join("--no-batch-norm" if k == "norm" else f"--{k}" for k in options)
        raise ToolkitError(f"weights given to --weights keep the architecture they were trained with: leave out "
                           f"{flags}, which build a new SmallField")
    model = build(args.model, args.weights, seed=args.seed, **options)
    if grow is not None:
        model = deepened(model, grow, seed=args.seed)
    train_set = CrowdDataset.for_model(train_root, model, density=args.density, crop=args.crop,
                                       max_images=args.max_train_images, erase=erase, dense=dense, scales=scales)
    val_set = None
    if args.val > 0:
        train_set, val_set = train_set.holdout(args.val, args.seed)
    test_set = CrowdDataset.for_model(test_root, model, density=args.density, max_images=args.max_test_images)
    out = run_dir(args, script, device, train_data=train_root, test_data=test_root,
                  val_images=None if val_set is None else val_set.names)
    return out, device, model, train_set, val_set, test_set


def run_dir(args: argparse.Namespace, script: str, device: torch.device | None = None, **resolved) -> Path:
    """Claim the run folder (`--out`, else a new runs/<script>/<timestamp>) and record the run in its args.json:
    the settings, with `device` and any other `resolved` values in place of what was asked for (`amp` is false
    where autocast does not run: on CUDA it runs in either dtype, on the CPU in bfloat16 only)."""
    if hasattr(args, "amp_dtype"):  # as `run` does; again for callers of a script's main()
        configure(args.amp_dtype, getattr(args, "compile", False))
    if device is not None:
        args.device = str(device)
        casts = autocasts(device, getattr(args, "amp", False), getattr(args, "amp_dtype", "float16"))
        resolved.setdefault("dtype", f"{args.amp_dtype} autocast" if casts else "float32")
        if hasattr(args, "amp") and not casts:
            resolved.setdefault("amp", False)
    for key, value in resolved.items():
        if hasattr(args, key):
            setattr(args, key, value)
    return runs.start(args, script, {k: v for k, v in resolved.items() if not hasattr(args, k)})


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, `kill` and cluster schedulers send), raised in the main thread of the main process so
    that a run cleans up exactly as on Ctrl-C (SIGINT); the script then exits with 143 (128 + SIGTERM) instead of
    130."""


_main_pid: int | None = None  # the process that installed the SIGTERM handler (forked workers inherit it)


def _on_sigterm(signum: int, frame) -> None:
    if os.getpid() != _main_pid:  # a forked DataLoader worker (a scheduler signals every process): the main
        return  # process ends it as it cleans up; dying now would turn the interrupt into a "worker killed" error
    raise Terminated()


def _install_sigterm():
    """Install `_on_sigterm`; returns the handler it replaced (None where signals cannot be set: not the main
    thread)."""
    global _main_pid
    if threading.current_thread() is not threading.main_thread():
        return None
    _main_pid = os.getpid()
    return signal.signal(signal.SIGTERM, _on_sigterm)


def _fail(prog: str, message: str, status: int = 2) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(status)


def run(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
        argv: list[str] | None = None) -> None:
    """Parse and call `main`. Errors a user can cause (bad input, a file system refusing --out) become one line on
    stderr and exit status 2. A run that fails or is interrupted (Ctrl-C: exit 130; SIGTERM, handled alike: exit 143)
    leaves no folder behind, unless it was resumed or holds a checkpoint to resume (`runs.discard_failed`)."""
    argv = sys.argv[1:] if argv is None else argv
    runs.begin(shlex.join(["python", parser.prog, *argv]))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # the library's progress lines
    joined = distributed.launched() and not distributed.initialised()
    previous = _install_sigterm()
    try:
        args = parser.parse_args(argv)
        if getattr(parser, "run_folder", False) and args.out is not None:  # a bad --out fails before any work
            runs.check_out(args, parser.prog.removesuffix(".py"))
        configure(getattr(args, "amp_dtype", "float16"), getattr(args, "compile", False))
        if distributed.launched():  # under torchrun: join the process group; rank 0 alone prints and logs
            pick_device(getattr(args, "device", "auto"))
            if not distributed.is_main():
                logging.getLogger().setLevel(logging.WARNING)
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of this process)
        main(args)
    except BaseException as e:
        if previous is not None:  # the cleanup below is not cut short by a second SIGTERM
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        close_progress()
        out = runs.current()
        discarded = runs.discard_failed() if not isinstance(e, SystemExit) else False
        if isinstance(e, ToolkitError):
            _fail(parser.prog, str(e))
        if isinstance(e, OSError):
            _fail(parser.prog, f"{e.filename}: {e.strerror or e}" if e.filename else str(e))
        if isinstance(e, KeyboardInterrupt):
            resumable = any("--resume" in a.option_strings for a in parser._actions)
            if resumable and out is not None and runs.resumable(out):
                hint = f"continue with: python {parser.prog} --out {out} --resume"
            elif out is not None and not discarded:
                hint = f"what was written is in {out}"
            else:
                hint = "nothing was written"
            terminated = isinstance(e, Terminated)
            print(f"{parser.prog}: {'terminated (SIGTERM)' if terminated else 'interrupted'}; {hint}", file=sys.stderr)
            sys.exit(143 if terminated else 130)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if joined:
            distributed.teardown()

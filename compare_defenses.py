"""Defenses side by side under the same attacks: one row per counter (`--row LABEL METHOD WEIGHTS`: a plain model,
randomized ablation's smoothed count, or the rf-clip / rf-mask certified counter of any weights) with its clean MAE
/ RMSE on the test split; APAM per patch size and target (default: maximize and minimize), each patch fitted through
that row's counter (its certified form where it has one) on crops of the train split and evaluated at the worst
placement of a sweep per image; the certified tight-MAE / RMSE per side beside the floor (the most heads under any
s×s square); forward passes and seconds per image. Every attacked count of a certified row is checked against its own
certificate, per image (rf-clip, rf-mask: deterministic certificates; randomized ablation: its attacked median against
the interval of other draws, a check of estimates). Writes comparison.md, metrics.json,
rows/<row>.json (each row once it is done: --resume reuses them, so a re-run rebuilds the table in minutes) and a
figure.

With no --row, the paper's experiment: undefended (--vanilla), adversarially trained (--adv) and ablation-trained
(--ra) models of one architecture, each trained here when its flag is omitted (on the synthetic default with short
schedules); with --row, only the models given.

    python compare_defenses.py       # synthetic crowds: trains the adversarial and ablation MCNNs, minutes
    python compare_defenses.py --data ShanghaiTech/part_B_final --density fixed --attack-images 60 \\
        --row "MCNN" plain path/to/mcnn_shtechB_110.h5 --row "MCNN rf-mask" rf-mask path/to/mcnn_shtechB_110.h5 \\
        --row "SmallField rf-mask" rf-mask smallfield-B --patch-sizes 40 81 --certify-sizes 20 40 81
"""
from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from datasets.crowd import CrowdDataset, largest_crop
from datasets.shanghaitech import list_images
from models import MODEL_NAMES, build, canonical_name, releases
from models.receptive_field import receptive_field
from utils import cli, runs
from utils.ablation import AblationSpec
from utils.attack import DEFAULT_SIDE, PROBE_LR, TARGETS, APAMConfig, attack_metrics
from utils.certify import AblationCertifier, Certifier, certify_patches, most_heads_in_square
from utils.engine import evaluate
from utils.errors import ToolkitError
from utils.io import atomic_write, load_checkpoint, load_json, save_json
from utils.local_eval import local_counter
from utils.metrics import summarize
from utils.patch import PLACEMENTS
from utils.plots import bar_figure
from utils.recipes import ABLATION_DEFAULTS, ADVERSARIAL_DEFAULTS, ablation_recipe, adversarial_recipe
from utils.rf_certify import DMAX_QUANTILE, RFClipCertifier, RFMaskCertifier, calibrate, load_calibration
from utils.runtime import pick_device, prepare_model
from utils.text import plural
from utils.training import DEFAULTS as PLAIN_DEFAULTS
from utils.training import VALIDATION, fit
from utils.victims import synthetic_victim

RF_METHODS = ("rf-clip", "rf-mask")  # deterministic certificates, from the receptive field
METHODS = ("plain", "ablation", *RF_METHODS)
KINDS = {"vanilla": ("undefended", "plain"), "adv": ("adversarial training", "plain"),
         "ra": ("randomized ablation", "ablation")}
# On the synthetic default: shorter schedules and a smaller test set, so the whole comparison takes minutes
SHORT = {"adv_epochs": 6, "adv_val_restarts": 1, "ra_epochs": 8, "ra_warmup_epochs": 2, "max_test_images": 20}
LONG = {"adv_epochs": ADVERSARIAL_DEFAULTS["epochs"], "adv_val_restarts": ADVERSARIAL_DEFAULTS["val_restarts"],
        "ra_epochs": ABLATION_DEFAULTS["epochs"], "ra_warmup_epochs": ABLATION_DEFAULTS["warmup_epochs"],
        "max_test_images": None}
ABLATION_BATCH = 16  # ablations per forward pass: 16 whole 768×1024 images through MCNN fit a laptop's memory
VICTIM = "the cached victim (train.py defaults, random erasing)"


@dataclass(frozen=True)
class Row:
    """One counter of the table: a label, how it counts (`METHODS`), its weights (a file or a release name) and,
    for rf-clip / rf-mask, an optional calibration file (else the release's, or one made on the train split)."""

    label: str
    method: str
    weights: str
    calibration: str | None = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-") or "row"


def _omitted(key: str) -> str:
    """What an omitted schedule flag takes: one value, or the synthetic default's and the other data's."""
    short, long = SHORT[key], LONG[key]
    return f"omitted: {long}" if short == long else f"omitted: {short} on the synthetic default, else {long}"


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.resume_from = runs.RECORD  # a resumed comparison reuses the rows it saved
    models = parser.add_argument_group("rows (checkpoints of these scripts, original weight files or release names)")
    models.add_argument("--row", nargs="+", action="append", metavar="LABEL METHOD WEIGHTS [CALIBRATION]",
                        help=f"a row: its label, its counter ({', '.join(METHODS)}), its weights and, for rf-clip / "
                             "rf-mask, a calibration.json (omitted: a release's own, else calibrated on the train "
                             "split); repeat for more rows")
    models.add_argument("--model", default="mcnn", type=canonical_name, choices=MODEL_NAMES,
                        help="architecture of the original weight files (.h5) and of the --vanilla, --adv, --ra "
                             "models (case-insensitive); checkpoints and releases record their own")
    omitted = ("trained here as train.py does (with no data given: the cached victim)",
               "trained here as MCNN_adv_train.py does, starting from --vanilla",
               "trained here as MCNN_certify_train.py does")
    for (kind, (label, _)), how in zip(KINDS.items(), omitted, strict=True):
        models.add_argument(f"--{kind}", type=Path, help=f"weights of the {label} row; omitted: without --row, {how}")
    cli.add_data_args(parser)
    group = parser.add_argument_group("training (of the models not given; omitted: the scripts' defaults, or the "
                                      "shorter schedules of the synthetic default)")
    group.add_argument("--adv-epochs", type=cli.positive_int,
                       help=f"adversarial training epochs ({_omitted('adv_epochs')})")
    group.add_argument("--adv-val-restarts", type=cli.positive_int, help="validation probe patches per epoch of "
                       f"adversarial training ({_omitted('adv_val_restarts')})")
    group.add_argument("--ra-epochs", type=cli.positive_int,
                       help=f"ablation training epochs ({_omitted('ra_epochs')})")
    group.add_argument("--ra-warmup-epochs", type=cli.non_negative_int, help="clean epochs before ablation starts "
                       f"({_omitted('ra_warmup_epochs')})")
    group = parser.add_argument_group("attack (probe patches, optimised per row)")
    group.add_argument("--patch-sizes", type=cli.positive_int, nargs="+", default=[20, DEFAULT_SIDE],
                       help="sides of the probe patches, in pixels (adversarial training uses the largest)")
    group.add_argument("--targets", nargs="+", choices=TARGETS, default=["maximize", "minimize"],
                       help="APAM objectives, one probe per target and side (as patch_attack.py --target)")
    cli.add_patch_args(parser, group)
    group.add_argument("--eval-placement", choices=PLACEMENTS, default="sweep",
                       help="where the probe goes on the test images; sweep tries a 3×3 grid of positions per image "
                            "and keeps the count farthest from the truth")
    group.add_argument("--attack-images", type=cli.positive_int,
                       help="evaluate the attacks (and randomized ablation, N passes per image) on this many test "
                            "images, evenly spaced in the split's order (listed in metrics.json); omitted: all")
    group.add_argument("--attack-epochs", type=cli.positive_int, default=6,
                       help="passes of each probe patch over crops of the train split (of the test split when "
                            "there is no train split)")
    group.add_argument("--restarts", type=cli.positive_int, default=2,
                       help="probe patches per row, size and target; the strongest counts")
    group.add_argument("--attack-crop", type=cli.positive_int, default=128,
                       help="side of the crops the probe patches are optimised on, in pixels (RA keeps the same "
                            "share of units in a crop as in an image)")
    group.add_argument("--attack-samples", type=cli.positive_int, default=8,
                       help="ablations per image for RA's smoothed (median) count under attack")
    group.add_argument("--eot", type=cli.positive_int, default=2,
                       help="ablations per crop in each attack step on RA (expectation over ablations)")
    cli.add_ablation_args(parser, trained=False)
    group = parser.add_argument_group("certificates")
    group.add_argument("--certify-sizes", type=cli.positive_int, nargs="+",
                       help="patch sides to certify (tight-MAE columns); omitted: --patch-sizes")
    group.add_argument("--samples", type=cli.positive_int, default=100, help="ablation: ablations per image (N)")
    group.add_argument("--alpha", type=float, default=0.05, help="ablation: 1 − confidence of the certificate")
    group.add_argument("--resume", action="store_true",
                       help="continue the comparison in --out: rows already done (rows/*.json) are reused, and "
                            "--row adds rows to it")
    cli.add_run_args(parser)
    parser.set_defaults(placement="random")  # a universal patch for a placement sweep: fitted anywhere
    return parser


def _parse_rows(entries: list[list[str]] | None) -> list[Row]:
    rows = []
    for entry in entries or []:
        if len(entry) not in (3, 4):
            raise ToolkitError(f"--row takes LABEL METHOD WEIGHTS [CALIBRATION], got {' '.join(entry)!r}")
        row = Row(*entry)
        if row.method not in METHODS:
            raise ToolkitError(f"--row {row.label!r}: unknown method {row.method!r}; choose from {', '.join(METHODS)}")
        if releases.find(row.weights) is None and not Path(row.weights).is_file():
            raise ToolkitError(f"--row {row.label!r}: weights not found: {row.weights} (a file or a release name: "
                               f"{', '.join(releases.releases()) or 'none'})")
        if row.calibration is not None and row.method not in RF_METHODS:
            raise ToolkitError(f"--row {row.label!r}: a calibration is for rf-clip and rf-mask, not {row.method}")
        if row.calibration is not None and not Path(row.calibration).is_file():
            raise ToolkitError(f"--row {row.label!r}: calibration not found: {row.calibration}")
        rows.append(row)
    return rows


def _unique(rows: list[Row]) -> None:
    """Each row its own label and row file (rows/<label>.json)."""
    seen = {}
    for row in rows:
        if row.slug in seen:
            raise ToolkitError(f"rows {seen[row.slug]!r} and {row.label!r} would share rows/{row.slug}.json: give each "
                               "row its own label")
        seen[row.slug] = row.label


def _architecture(weights: str | Path, default: str) -> str:
    """The model a weight file holds: a release's or a checkpoint's record, else `default` (original .h5 files)."""
    found = releases.find(weights)
    if found is not None:
        return found.model
    if Path(weights).suffix.lower() in (".h5", ".hdf5"):
        return default
    return load_checkpoint(weights).get("model") or default


def _build(weights: str | Path, default: str):
    """The model a weight file holds, built with the options its checkpoint records."""
    return build(_architecture(weights, default), weights)


def _check_architectures(args: argparse.Namespace) -> None:
    for kind in KINDS:
        path = getattr(args, kind)
        if path is None or path.suffix.lower() in (".h5", ".hdf5"):  # original weight files: build() checks them
            continue
        name = _architecture(path, args.model)
        if name != args.model:
            raise ToolkitError(f"--{kind} {path} holds a {name} model, not {args.model}: all three must share one "
                               "architecture (--model)")


def _train(kind: str, args: argparse.Namespace, checkpoints: dict, train_root: Path, test_root: Path,
           synthetic: bool, out: Path, device: torch.device) -> Path:
    """Checkpoint of `kind` trained here, as its script trains it (with --adv-epochs etc. in place of --epochs)."""
    if kind == "vanilla" and synthetic:
        return synthetic_victim(args.model, device, args.seed)
    defaults = {"vanilla": PLAIN_DEFAULTS, "adv": ADVERSARIAL_DEFAULTS, "ra": ABLATION_DEFAULTS}[kind]
    model = build(args.model, checkpoints["vanilla"] if kind == "adv" else None, seed=args.seed)
    # the scripts' crop, or the largest that fits an image of each split where that is smaller (small data)
    fits = min(largest_crop(list_images(root), model.size_multiple) for root in (train_root, test_root))
    crop = max(min(defaults["crop"], fits), model.size_multiple)
    train_set, val_set = CrowdDataset.for_model(train_root, model, density=args.density, crop=crop).holdout(
        VALIDATION, args.seed)
    test_set = CrowdDataset.for_model(test_root, model, density=args.density)
    epochs, recipe = defaults["epochs"], None
    if kind == "adv":
        epochs = args.adv_epochs
        spec = cli.patch_spec(args, max(args.patch_sizes))
        recipe = adversarial_recipe(val_set, spec, APAMConfig(lr=defaults["attack_lr"]), crop=crop,
                                    attack_steps=defaults["attack_steps"], kappa_spec=defaults["kappa"], epochs=epochs,
                                    val_epochs=defaults["val_epochs"], val_restarts=args.adv_val_restarts,
                                    seed=args.seed, device=device, amp=args.amp)
    elif kind == "ra":
        epochs, spec = args.ra_epochs, cli.ablation_spec(args, None)
        recipe = ablation_recipe(test_set, spec.keep, spec.unit, spec.fill, args.ra_warmup_epochs,
                                 defaults["val_samples"], args.seed, device)
    fit(model, train_set, val_set, None, out / kind, epochs=epochs, batch_size=defaults["batch_size"],  # scored below
        lr=defaults["lr"], device=device, amp=args.amp, workers=args.workers, recipe=recipe,
        record={"trained_by": "compare_defenses", "kind": kind, "val_images": val_set.names}, seed=args.seed,
        figure_format=args.figure_format, resume=(out / kind / "last.pt").is_file())  # an interrupted run: go on
    best = out / kind / "best.pt"  # none when no epoch was eligible (adversarial training still at κ = 1)
    return best if best.is_file() else out / kind / "last.pt"


def _ablation_spec(args: argparse.Namespace, weights: str | Path) -> AblationSpec:
    """The ablation a checkpoint was trained with (--keep, --unit, --fill override it)."""
    path = releases.resolve(weights)
    trained = AblationSpec.from_checkpoint(load_checkpoint(path)) if path.suffix.lower() not in (".h5", ".hdf5") \
        else None
    if trained is None and args.keep is None:
        raise ToolkitError(f"{weights} records no ablation (not from MCNN_certify_train.py); pass --keep")
    return cli.ablation_spec(args, trained)


def _attack_subset(dataset: CrowdDataset, n: int | None) -> CrowdDataset:
    """`n` images evenly spaced in the split's order (all of them when `n` is omitted or not smaller)."""
    if n is None or n >= len(dataset):
        return dataset
    return dataset.subset(sorted({int(i) for i in np.linspace(0, len(dataset) - 1, n).round()}))


def _calibration(row: Row, model, rf, args: argparse.Namespace, train_root: Path, sides: list[int], out: Path,
                 device: torch.device):
    """rf-clip / rf-mask constants: the row's file, a release's own, or calibrated on the train split (once per
    weights file, kept in calibration/ for the other rows and a resumed run)."""
    found = releases.find(row.weights)
    if row.calibration is not None or found is not None:
        return load_calibration(Path(row.calibration) if row.calibration else releases.calibration(found), rf)
    path = out / "calibration" / f"{re.sub(r'[^A-Za-z0-9]+', '-', str(row.weights)).strip('-')}.json"
    if path.is_file():
        return load_calibration(path, rf)
    split = CrowdDataset.for_model(train_root, model, density=args.density, cache=False)
    calibration = calibrate(model, split, rf, sides, device, DMAX_QUANTILE, args.amp)
    calibration.save(path)
    return calibration


def _certifier(row: Row, model, args: argparse.Namespace, train_root: Path, sides: list[int], out: Path,
               device: torch.device, samples: int) -> Certifier | None:
    """The row's certified counter (None for a plain model), with `samples` ablations per image for ablation."""
    if row.method == "plain":
        return None
    if row.method == "ablation":
        return AblationCertifier(_ablation_spec(args, row.weights), samples, args.alpha, ABLATION_BATCH, eot=args.eot,
                                 seed=args.seed, generator=torch.Generator(device=device).manual_seed(args.seed))
    counter, rf = RFClipCertifier if row.method == "rf-clip" else RFMaskCertifier, receptive_field(model)
    return counter(rf, _calibration(row, model, rf, args, train_root, sides, out, device))


def _check(attacked: list[dict], certified: dict[str, dict], side: int) -> dict:
    """How many attacked counts of images certified for `side` were checked, and the images whose count lies outside
    their certified [L, U]."""
    bounds = [(r["attacked"], certified[r["image"]][f"L{side}"], certified[r["image"]][f"U{side}"], r["image"])
              for r in attacked]
    bounds = [b for b in bounds if not math.isnan(b[1])]  # not certified: nothing promised
    return {"counts": len(bounds), "outside": [name for count, low, high, name in bounds if not low <= count <= high]}


def _evaluate_row(row: Row, args: argparse.Namespace, train_root: Path, test_root: Path, out: Path,
                  device: torch.device) -> dict:
    """Clean, certified and attacked figures of one row (see the module docstring)."""
    model = prepare_model(_build(row.weights, args.model), device).eval()
    test_set = CrowdDataset.for_model(test_root, model, density=args.density, max_images=args.max_test_images)
    subset = _attack_subset(test_set, args.attack_images)
    attack_max = args.max_test_images if train_root == test_root else args.max_train_images
    attack_set = CrowdDataset.for_model(train_root, model, density=args.density, max_images=attack_max)
    crop = min(args.attack_crop, attack_set.smallest_side() // model.size_multiple * model.size_multiple)
    attack_specs = {s: cli.patch_spec(args, s) for s in args.patch_sizes}
    specs = {s: cli.patch_spec(args, s) for s in sorted({*args.patch_sizes, *args.certify_sizes})}
    for spec in attack_specs.values():
        spec.check_fits(crop, "the attack crops")
    attack_set = CrowdDataset.for_model(train_root, model, density=args.density, crop=crop, max_images=attack_max)
    covered = sorted({RFMaskCertifier.covered_side(spec) for spec in specs.values()})
    certifier = _certifier(row, model, args, train_root, covered, out, device, args.samples)
    # randomized ablation takes N passes per image: its certificate and clean count on the attack images only
    scored = subset if row.method == "ablation" else test_set
    start = time.perf_counter()
    certificate = None
    if certifier is None:
        _, per_image, _ = evaluate(model, scored, device, args.amp, desc=row.label)
        per_image = [{**r, "count": r["pred"]} for r in per_image]
    else:
        per_image, certificate = certify_patches(certifier, model, scored, specs, device, args.amp)
    seconds = (time.perf_counter() - start) / len(scored)
    first = min(args.patch_sizes)
    count_key = f"count{first}" if certifier is not None and certifier.count_per_side else "count"
    result = {**asdict(row), "model": model.name, "test_images": len(test_set), "scored_images": len(scored),
              "attack_images": subset.names, "attack_crop": crop,
              "attack_split": "test" if train_root == test_root else "train",
              "clean": summarize([r[count_key] for r in per_image], [r["gt"] for r in per_image]),
              "clean_counter": f"{first} px" if count_key != "count" else None,
              "forward_passes_per_image": args.samples if row.method == "ablation" else 1,
              "seconds_per_image": seconds, "certificate": certificate, "attacked": {}, "checked": {},
              "per_image": per_image}
    by_image = {r["image"]: r for r in per_image}
    sweep = args.eval_placement == "sweep"  # each placement evaluated where the patch reaches (`utils.local_eval`)
    through, counter = None, local_counter(model) if sweep and row.method == "plain" else model
    if row.method == "ablation":  # attacked through an expectation over ablations, counted by the smoothed count
        smoothed = _certifier(row, model, args, train_root, covered, out, device, args.attack_samples)
        through = partial(smoothed.attack_density, model)
        counter = smoothed.local_counter(model) if sweep else partial(smoothed.density, model)
    for side, spec in attack_specs.items():
        if row.method in RF_METHODS:  # the counter for the patch as the certificate covers it
            through = partial(certifier.attack_density, model, side=certifier.covered_side(spec))
            counter = certifier.local_counter(model, certifier.covered_side(spec)) if sweep else \
                partial(certifier.density, model, side=certifier.covered_side(spec))
        result["attacked"][str(side)], result["checked"][str(side)] = {}, {}
        for target in args.targets:
            metrics, attacked = attack_metrics(
                model, attack_set, subset, spec, device, args.amp, APAMConfig(target=target, lr=PROBE_LR),
                epochs=args.attack_epochs, restarts=args.restarts, seed=args.seed, attack_through=through,
                counter=counter, placement=args.eval_placement, control=False)
            result["attacked"][str(side)][target] = {**metrics["attacked"], "clean": metrics["clean"],
                                                "counts": [r["attacked"] for r in attacked]}
            if certifier is not None:  # ablation: a median of fresh draws against the interval of --samples others
                result["checked"][str(side)][target] = _check(attacked, by_image, side)
    return result


def _run_row(row: Row, args: argparse.Namespace, train_root: Path, test_root: Path, out: Path,
             device: torch.device) -> dict:
    """The row's results: those saved by an earlier run of this comparison (same row), else computed and saved."""
    path = out / "rows" / f"{row.slug}.json"
    if path.is_file():
        saved = load_json(path)
        if {k: saved.get(k) for k in asdict(row)} == asdict(row):
            print(f"{row.label}: reusing {path}")
            return saved
    print(f"{row.label}: {row.method} counter of {row.weights}")
    result = _evaluate_row(row, args, train_root, test_root, out, device)
    save_json(path, result)
    return result


def _cell(m: dict | None) -> str:
    return "" if m is None or m.get("mae") is None else f"{m['mae']:.2f} / {m['rmse']:.2f}"


def _tight(c: dict) -> str:
    """A certified side's cell: certified fraction when not all, tight-MAE / RMSE, its own counter's MAE."""
    if not c["certified_fraction"]:
        return "0 % certified"
    share = "" if c["certified_fraction"] == 1 else f"{c['certified_fraction']:.0%}: "
    return share + f"{c['tight_mae']:.2f} / {c['tight_rmse']:.2f}"


def _table(results: dict, floors: dict, args: argparse.Namespace, notes: list[str]) -> str:
    attacks = [(s, t) for s in args.patch_sizes for t in args.targets]
    header = (["counter", "passes / image", "s / image", "clean MAE / RMSE"]
              + [f"APAM {t} {s} px" for s, t in attacks]
              + [f"certified {s} px: tight-MAE / RMSE" for s in args.certify_sizes]
              + ["attacked counts outside the certificate"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results.values():
        cert = (r["certificate"] or {}).get("patch_sizes", {})
        checked = [c for per_side in r["checked"].values() for c in per_side.values()]
        outside = f"{sum(len(c['outside']) for c in checked)} of {sum(c['counts'] for c in checked)}" if checked \
            else ""
        clean = _cell(r["clean"]) + (f" ({r['clean_counter']} counter)" if r["clean_counter"] else "") \
            + (" ‡" if r["scored_images"] < r["test_images"] else "")
        cells = [r["label"], str(r["forward_passes_per_image"]), f"{r['seconds_per_image']:.3f}", clean]
        cells += [_cell(r["attacked"][str(s)][t]) for s, t in attacks]
        cells += [_tight(cert[str(s)]) if str(s) in cert else "" for s in args.certify_sizes]
        lines.append("| " + " | ".join(cells + [outside]) + " |")
    lines.append("| floor: most heads under any s×s square | | | | " + " | " * len(attacks)
                 + " | ".join(f"{floors[s]:.2f}" for s in args.certify_sizes) + " | |")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def _notes(results: dict, args: argparse.Namespace, trained: list[str], synthetic: bool) -> list[str]:
    any_row = next(iter(results.values()))
    n, attack_n = any_row["test_images"], len(any_row["attack_images"])
    notes = [f"{plural(n, 'test image')}; attacks on {attack_n}"
             + (" (evenly spaced in the split's order, listed in metrics.json)" if attack_n < n else "") + ".",
             "Attack: per row, side and target " + (f"the strongest (highest MAE) of {args.restarts} APAM patches"
                                                     if args.restarts > 1 else "one APAM patch")
             + f" ({args.patch_shape}, step {PROBE_LR}), " + ("each " if args.restarts > 1 else "")
             + f"{plural(args.attack_epochs, 'pass', 'passes')} over "
             f"{any_row['attack_crop']}-px crops of the {any_row['attack_split']} split"
             + (f" (its first {args.max_train_images} images)" if args.max_train_images else "")
             + f" at {args.placement} positions, fitted through the row's counter and evaluated at "
             f"{args.eval_placement} placement"
             + (" (the worst of a 3×3 grid per image)" if args.eval_placement == "sweep" else "") + ".",
             "Certificates: each side certified for every pixel the toolkit's patch of that side can change (rf-clip "
             "and rf-mask at its extent, ablation at its footprint; metrics.json records the sides); rf-mask counts "
             "with a counter per side (tight-MAE against that counter's own interval)."]
    if any(r["method"] == "ablation" for r in results.values()):
        notes.append(f"Randomized ablation: the median of {args.samples} ablations (its certificate, at confidence "
                     f"{1 - args.alpha:g}) and of {args.attack_samples} under attack, attacked through "
                     f"{plural(args.eot, 'ablation')} per crop; its attacked counts are checked against the "
                     "interval of its certificate, which bounds the median of other draws at that confidence"
                     + ("; ‡ its clean count and certificate on the attack images only." if any(
                         r["scored_images"] < r["test_images"] for r in results.values()) else "."))
    if trained:
        how = {"vanilla": VICTIM if synthetic else f"{PLAIN_DEFAULTS['epochs']} epochs",
               "adv": f"{args.adv_epochs} epochs, {args.adv_val_restarts} validation probe(s) per epoch",
               "ra": f"{args.ra_epochs} epochs, {args.ra_warmup_epochs} clean"}
        notes.append("Trained here" + (" on the synthetic crowds with short schedules" if synthetic else "") + ": "
                     + ", ".join(f"{k}: {how[k]}" for k in trained) + ".")
    return notes


def _write(out: Path, results: dict, floors: dict, args: argparse.Namespace, notes: list[str]) -> str:
    """comparison.md, metrics.json and the figure of the rows in `results`; the table."""
    table = _table(results, floors, args, notes)
    atomic_write(out / "comparison.md", lambda tmp: Path(tmp).write_text(table))
    save_json(out / "metrics.json", {"floors": floors, "rows": {k: {key: v for key, v in r.items()
                                                                    if key != "per_image"}
                                                                for k, r in results.items()}})
    bar_figure(out / f"comparison.{args.figure_format}",
               {label: {"clean": r["clean"]["mae"], **{f"{t} {s}px": r["attacked"][str(s)][t]["mae"]
                                                       for s in args.patch_sizes for t in args.targets}}
                for label, r in results.items()},
               ylabel="MAE (people)", xlabel="counter", title="MAE clean and under patch attacks (lower is better)")
    return table


def main(args: argparse.Namespace) -> dict:
    if not 0 < args.alpha < 1:
        raise ToolkitError(f"--alpha must lie in (0, 1), got {args.alpha}")
    runs.check_out(args, "compare_defenses")
    rows = _parse_rows(args.row)
    _check_architectures(args)
    device = pick_device(args.device)
    synthetic = not (args.data or args.train_data or args.test_data)
    for name, value in (SHORT if synthetic else LONG).items():  # the schedules, final before args.json is written
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.certify_sizes = args.certify_sizes or list(args.patch_sizes)
    train_root, test_root = cli.resolve_splits(args.data, args.train_data, args.test_data)
    train_root = train_root or test_root
    kinds = [kind for kind in KINDS if getattr(args, kind) is not None or not rows]
    trained = [kind for kind in kinds if getattr(args, kind) is None]
    # the ablation of the RA row (an RA checkpoint without one fails now), which names it
    keep = (_ablation_spec(args, args.ra) if "ra" in kinds and "ra" not in trained else cli.ablation_spec(args, None)
            ).keep
    labels = {k: KINDS[k][0] + (f" (k={keep})" if k == "ra" else "") for k in kinds}
    _unique([Row(labels[k], KINDS[k][1], "") for k in kinds] + rows)
    for row in rows:
        if row.method == "ablation":
            _ablation_spec(args, row.weights)
    out = cli.run_dir(args, "compare_defenses", device,
                      data_folders={"train": str(train_root), "test": str(test_root)})
    checkpoints = {kind: getattr(args, kind) for kind in KINDS}
    for kind in trained:
        checkpoints[kind] = _train(kind, args, checkpoints, train_root, test_root, synthetic, out, device)
    rows = [Row(labels[k], KINDS[k][1], str(checkpoints[k])) for k in kinds] + rows
    probe = CrowdDataset.for_model(test_root, _build(rows[0].weights, args.model), density=args.density,
                                   max_images=args.max_test_images)
    floors = {s: float(np.mean([most_heads_in_square(probe.head_points(i), hw, s)
                                for i, hw in enumerate(probe.sizes())])) for s in args.certify_sizes}
    results = {}
    for row in rows:  # the table so far after every row: a long comparison shows its rows as they are done
        results[row.label] = _run_row(row, args, train_root, test_root, out, device)
        table = _write(out, results, floors, args, _notes(results, args, trained, synthetic))
    for kind, methods in (("deterministic certificates", RF_METHODS), ("randomized ablation", ("ablation",))):
        checked = [c for r in results.values() if r["method"] in methods
                   for side in r["checked"].values() for c in side.values()]
        if checked:
            print(f"{kind}: {sum(len(c['outside']) for c in checked)} of {sum(c['counts'] for c in checked)} "
                  "attacked counts outside their certified interval")
    print(table + f"-> {out}")
    return results


if __name__ == "__main__":
    cli.run(main, get_args_parser())

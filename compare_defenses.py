"""Undefended vs adversarially trained vs ablation-trained (RA) models of one architecture on one dataset, under
the same APAM attack: per model clean MAE / RMSE and attacked MAE / RMSE per patch size (the RA model through its
smoothed count, attacked with an expectation over ablations), and for RA the certified fraction and tight-MAE / MSE.
Writes comparison.md, metrics.json and a comparison figure.

    python compare_defenses.py          # synthetic crowds: trains the three MCNNs with short schedules (~13 CPU min)
    python compare_defenses.py --vanilla V.pt --adv A.pt --ra R.pt --data ShanghaiTech/part_A_final \\
        --patch-sizes 20 40 81 163 --attack-epochs 6 --samples 1000
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import MCNN_adv_train
import MCNN_certify_train
import train
from datasets.crowd import CrowdDataset
from models import MODEL_NAMES, build, canonical_name
from utils import cli
from utils.ablation import ablate, mean_units, scaled_keep
from utils.attack import DEFAULT_SIDE, attack_metrics
from utils.certify import SmoothedCounter, certify_dataset
from utils.errors import ToolkitError
from utils.io import atomic_write, load_checkpoint, save_json
from utils.patch import PatchTransform, footprint_side, make_mask
from utils.plots import bar_figure
from utils.runtime import pick_device, prepare_model, seed_everything
from utils.victims import synthetic_victim

KINDS = ("vanilla", "adv", "ra")
# The synthetic default's shorter schedules and smaller test set, printed with the table
SHORT = {"adv": ["--epochs", "6", "--val-attack-restarts", "1"], "ra": ["--epochs", "8", "--warmup-epochs", "2"]}
SHORT_TEST_IMAGES = 20
VICTIM = "the cached victim (train.py defaults, random erasing)"
PROBE_SHAPE = "circle"


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    models = parser.add_argument_group("models (checkpoints of these scripts, or original weight files)")
    models.add_argument("--model", default="mcnn", type=canonical_name, choices=MODEL_NAMES,
                        help="network architecture of all three models (case-insensitive)")
    cli.add_data_args(parser)
    omitted = ("trained here with train.py (with no data given: the cached victim)",
               "trained here with MCNN_adv_train.py, starting from --vanilla",
               "trained here with MCNN_certify_train.py")
    for kind, what, how in zip(KINDS, ("undefended", "adversarially trained", "ablation-trained (RA)"), omitted,
                               strict=True):
        models.add_argument(f"--{kind}", type=Path, help=f"weights of the {what} model; omitted: {how}")
    group = parser.add_argument_group("attack (probe patches, circles, optimised per model)")
    group.add_argument("--patch-sizes", type=cli.positive_int, nargs="+", default=[20, DEFAULT_SIDE],
                       help="sides of the probe patches, in pixels")
    group.add_argument("--attack-epochs", type=cli.positive_int, default=6,
                       help="passes of each probe patch over crops of the train split (of the test split when "
                            "there is no train split)")
    group.add_argument("--restarts", type=cli.positive_int, default=2,
                       help="probe patches per model and size; the strongest counts")
    group.add_argument("--attack-crop", type=cli.positive_int, default=128,
                       help="side of the crops the probe patches are optimised on, in pixels (RA keeps the same "
                            "share of units in a crop as in an image)")
    group.add_argument("--attack-samples", type=cli.positive_int, default=8,
                       help="ablations per image for RA's smoothed (median) count under attack")
    group.add_argument("--eot", type=cli.positive_int, default=2,
                       help="ablations per crop in each attack step on RA (expectation over ablations)")
    group = parser.add_argument_group("certificate (RA model)")
    group.add_argument("--keep", type=cli.positive_int,
                       help="units kept per ablation (k); omitted: read from the --ra checkpoint's training arguments")
    group.add_argument("--samples", type=cli.positive_int, default=100, help="ablations per image (N)")
    group.add_argument("--alpha", type=float, default=0.05, help="1 − confidence of the ablation certificate")
    cli.add_run_args(parser)
    return parser


def _train(kind: str, args: argparse.Namespace, out: Path) -> Path:
    """Checkpoint of `kind` trained by its script, with the short schedules on the synthetic default."""
    data = [f for flag in ("data", "train_data", "test_data") if getattr(args, flag)
            for f in (f"--{flag.replace('_', '-')}", str(getattr(args, flag)))]
    common = ["--model", args.model, *data, "--device", args.device, "--seed", str(args.seed), "--out"]
    if kind == "vanilla":
        if not data:
            return synthetic_victim(args.model, pick_device(args.device))
        train.main(train.get_args_parser().parse_args([*common, str(out / kind)]))
        return out / kind / "best.pt"
    script = MCNN_adv_train if kind == "adv" else MCNN_certify_train
    extra = list(SHORT[kind]) if not data else []
    if kind == "adv":
        extra += ["--weights", str(args.vanilla), "--patch-size", str(max(args.patch_sizes))]
    script.main(script.get_args_parser().parse_args([*common, str(out / kind), *extra]))
    return out / kind / "best.pt"


def _check_architectures(args: argparse.Namespace) -> None:
    for kind in KINDS:
        path = getattr(args, kind)
        if path is None or path.suffix.lower() in (".h5", ".hdf5"):  # original weight files: build() checks them
            continue
        name = load_checkpoint(path).get("model")
        if name != args.model:
            raise ToolkitError(f"--{kind} {path} holds a {name} model, not {args.model}: all three must share one "
                               "architecture (--model)")


def _ablation_of(path: Path, keep: int | None) -> tuple[int, str]:
    """(k, unit) of the RA model: `--keep`, else what its checkpoint's training arguments say."""
    recorded = load_checkpoint(path).get("args", {})
    keep = keep or recorded.get("keep")
    if keep is None:
        raise ToolkitError(f"--ra {path} does not record its keep (not from MCNN_certify_train.py); pass --keep")
    return keep, recorded.get("unit", "element")


def _evaluate(kind: str, model, attack_root: Path, test_root: Path, args: argparse.Namespace, device: torch.device,
              ablation: tuple[int, str], gen: torch.Generator) -> dict:
    """Clean and probe-attacked metrics of one model; for RA those of its smoothed count, plus the certificate.
    The probe patches are optimised on crops of `attack_root` (as patch_attack.py, a split other than the test's)."""
    test_set = CrowdDataset.for_model(test_root, model, density=args.density, max_images=args.max_test_images)
    attack_max = args.max_test_images if attack_root == test_root else args.max_train_images
    attack_set = CrowdDataset.for_model(attack_root, model, density=args.density, max_images=attack_max)
    crop = min(args.attack_crop, attack_set.smallest_side() // model.size_multiple * model.size_multiple)
    if max(args.patch_sizes) > crop:
        raise ToolkitError(f"patch side {max(args.patch_sizes)} is larger than the attack crops ({crop} px)")
    attack_set = CrowdDataset.for_model(attack_root, model, density=args.density, crop=crop, max_images=attack_max)
    through = counter = None
    if kind == "ra":
        keep, unit = ablation
        reference = mean_units(test_set.sizes(), unit)

        def through(x: torch.Tensor) -> torch.Tensor:  # the attack's expectation over ablations
            k = scaled_keep(keep, x.shape, reference, unit)
            return model(ablate(x.repeat_interleave(args.eot, dim=0), k, unit, generator=gen))
        counter = SmoothedCounter(model, keep, args.attack_samples, unit, generator=gen)
    result = {"attacked": {}, "test_images": len(test_set), "attack_crop": crop,
              "attack_split": "test" if attack_root == test_root else "train"}
    for side in args.patch_sizes:
        metrics, _ = attack_metrics(model, attack_set, test_set, side, make_mask(side, PROBE_SHAPE), device, args.amp,
                                    epochs=args.attack_epochs, restarts=args.restarts, seed=args.seed,
                                    attack_through=through, counter=counter)
        result["attacked"][side], result["clean"] = metrics["attacked"], metrics["clean"]
    if kind == "ra":
        # certified for each probe's footprint (rotation, scale and bilinear rim included), at least its side
        cover = {s: max(s, footprint_side(s, PROBE_SHAPE, PatchTransform())) for s in args.patch_sizes}
        _, cert = certify_dataset(model, test_set, keep, args.samples, sorted(set(cover.values())), args.alpha, unit,
                                  device=device, amp=args.amp, generator=gen)
        cert["patch_sizes"] = {str(s): {"certified_side": c, **cert["patch_sizes"][str(c)]} for s, c in cover.items()}
        result.update(clean=cert["smoothed"], certificate=cert)
    return result


def _table(results: dict, args: argparse.Namespace, keep: int, trained: list[str]) -> str:
    header = "| model | clean MAE / RMSE | " + " | ".join(f"APAM {s}px MAE / RMSE" for s in args.patch_sizes) + \
        " | RA certificate per patch size: certified fraction, tight-MAE / MSE |"
    lines = [header, "|" + "---|" * (len(args.patch_sizes) + 3)]
    for kind, label in zip(KINDS, ("undefended", "adversarial training", f"randomized ablation (k={keep})"),
                           strict=True):
        r = results[kind]
        cells = [f"{m['mae']:.2f} / {m['mse']:.2f}" for m in (r["clean"], *r["attacked"].values())]
        cert = "; ".join(f"{s}px (as {c['certified_side']}px): {c['certified_fraction']:.0%}, "
                         f"{c['tight_mae']:.2f} / {c['tight_mse']:.2f}"
                         for s, c in r.get("certificate", {}).get("patch_sizes", {}).items())
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {cert} |")
    ra = results["ra"]
    note = (f"{args.model}, {ra['test_images']} test images. Attack: per model and patch size the strongest (highest "
            f"MAE) of {args.restarts} APAM patches (pred-scale, tau 10), each {args.attack_epochs} passes over "
            f"{ra['attack_crop']}-px crops of the {ra['attack_split']} split; RA attacked through {args.eot} "
            f"ablations per crop and counted by the median of {args.attack_samples}. Certificate: {args.samples} "
            f"samples, alpha {args.alpha}, for a square patch of the side shown in brackets: the probe's side, or more "
            "where its rotation, scale and bilinear rim can change more pixels than that side squared.")
    if trained and not (args.data or args.train_data or args.test_data):
        note += " Trained here on the synthetic crowds with short schedules: " + ", ".join(
            f"{k}: {' '.join(SHORT.get(k, [VICTIM]))}" for k in trained) + \
            f"; evaluated on the first {args.max_test_images} test images."
    return "\n".join(lines) + "\n\n" + note + "\n"


def main(args: argparse.Namespace) -> dict:
    if not 0 < args.alpha < 1:
        raise ToolkitError(f"--alpha must lie in (0, 1), got {args.alpha}")
    _check_architectures(args)
    device = pick_device(args.device)
    out = cli.run_dir(args, "compare_defenses", device)
    trained = [kind for kind in KINDS if getattr(args, kind) is None]
    synthetic = not (args.data or args.train_data or args.test_data)
    if synthetic and args.max_test_images is None:
        args.max_test_images = SHORT_TEST_IMAGES
    for kind in trained:
        setattr(args, kind, _train(kind, args, out))
    ablation = _ablation_of(args.ra, args.keep)
    train_root, test_root = cli.resolve_splits(args.data, args.train_data, args.test_data)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    results = {}
    for kind in KINDS:
        seed_everything(args.seed)  # the same crops and draws for every model
        model = prepare_model(build(args.model, getattr(args, kind)), device).eval()
        results[kind] = {"checkpoint": str(getattr(args, kind)),
                         **_evaluate(kind, model, train_root or test_root, test_root, args, device, ablation, gen)}
    table = _table(results, args, ablation[0], trained)
    atomic_write(out / "comparison.md", lambda tmp: Path(tmp).write_text(table))
    save_json(out / "metrics.json", results)
    bar_figure(out / f"comparison.{args.figure_format}", {kind: {"clean": results[kind]["clean"]["mae"],
                                                                **{f"{s}px": results[kind]["attacked"][s]["mae"]
                                                                   for s in args.patch_sizes}} for kind in KINDS},
               ylabel="MAE (people)", xlabel="model", title="MAE clean and under patch attacks (lower is better)")
    print(table + f"-> {out}")
    return results


if __name__ == "__main__":
    cli.run(main, get_args_parser())

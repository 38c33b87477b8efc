"""Undefended vs adversarially trained vs ablation-trained (RA) models of one architecture on one dataset, under
the same APAM attack: per model clean MAE / RMSE and attacked MAE / RMSE per patch size (the RA model through its
smoothed count, attacked with an expectation over ablations), and for RA the certified fraction and tight-MAE / RMSE.
Writes comparison.md, metrics.json and a comparison figure.

    python compare_defenses.py          # synthetic crowds: trains the two defended MCNNs with short schedules
    python compare_defenses.py --vanilla V.pt --adv A.pt --ra R.pt --data ShanghaiTech/part_A_final \\
        --patch-sizes 20 40 81 163 --attack-epochs 6 --samples 1000
"""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

from datasets.crowd import CrowdDataset, largest_crop
from datasets.shanghaitech import list_images
from models import MODEL_NAMES, build, canonical_name
from utils import cli, runs
from utils.ablation import AblationSpec
from utils.attack import DEFAULT_SIDE, APAMConfig, attack_metrics
from utils.certify import AblationCertifier, certify_patches
from utils.errors import ToolkitError
from utils.io import atomic_write, load_checkpoint, save_json
from utils.plots import bar_figure
from utils.recipes import ABLATION_DEFAULTS, ADVERSARIAL_DEFAULTS, ablation_recipe, adversarial_recipe
from utils.runtime import pick_device, prepare_model
from utils.text import plural
from utils.training import DEFAULTS as PLAIN_DEFAULTS
from utils.training import VALIDATION, fit
from utils.victims import synthetic_victim

KINDS = ("vanilla", "adv", "ra")
LABELS = {"vanilla": "undefended", "adv": "adversarial training", "ra": "randomized ablation"}
# On the synthetic default: shorter schedules and a smaller test set, so the whole comparison takes minutes
SHORT = {"adv_epochs": 6, "adv_val_restarts": 1, "ra_epochs": 8, "ra_warmup_epochs": 2, "max_test_images": 20}
LONG = {"adv_epochs": ADVERSARIAL_DEFAULTS["epochs"], "adv_val_restarts": ADVERSARIAL_DEFAULTS["val_restarts"],
        "ra_epochs": ABLATION_DEFAULTS["epochs"], "ra_warmup_epochs": ABLATION_DEFAULTS["warmup_epochs"],
        "max_test_images": None}
VICTIM = "the cached victim (train.py defaults, random erasing)"


def _omitted(key: str) -> str:
    """What an omitted schedule flag takes: one value, or the synthetic default's and the other data's."""
    short, long = SHORT[key], LONG[key]
    return f"omitted: {long}" if short == long else f"omitted: {short} on the synthetic default, else {long}"


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    models = parser.add_argument_group("models (checkpoints of these scripts, or original weight files)")
    models.add_argument("--model", default="mcnn", type=canonical_name, choices=MODEL_NAMES,
                        help="network architecture of all three models (case-insensitive)")
    omitted = ("trained here as train.py does (with no data given: the cached victim)",
               "trained here as MCNN_adv_train.py does, starting from --vanilla",
               "trained here as MCNN_certify_train.py does")
    for kind, how in zip(KINDS, omitted, strict=True):
        models.add_argument(f"--{kind}", type=Path, help=f"weights of the {LABELS[kind]} model; omitted: {how}")
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
    group = parser.add_argument_group("attack (probe patches, optimised per model)")
    group.add_argument("--patch-sizes", type=cli.positive_int, nargs="+", default=[20, DEFAULT_SIDE],
                       help="sides of the probe patches, in pixels (adversarial training uses the largest)")
    cli.add_patch_args(parser, group, placement=False)
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
    cli.add_ablation_args(parser, trained=False)
    group = parser.add_argument_group("certificate (RA model)")
    group.add_argument("--samples", type=cli.positive_int, default=100, help="ablations per image (N)")
    group.add_argument("--alpha", type=float, default=0.05, help="1 − confidence of the ablation certificate")
    cli.add_run_args(parser)
    return parser


def _check_architectures(args: argparse.Namespace) -> None:
    for kind in KINDS:
        path = getattr(args, kind)
        if path is None or path.suffix.lower() in (".h5", ".hdf5"):  # original weight files: build() checks them
            continue
        name = load_checkpoint(path).get("model")
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
        figure_format=args.figure_format)
    best = out / kind / "best.pt"  # none when no epoch was eligible (adversarial training still at κ = 1)
    return best if best.is_file() else out / kind / "last.pt"


def _ra_spec(args: argparse.Namespace, checkpoint: Path) -> AblationSpec:
    """The ablation the RA model was trained with (--keep, --unit, --fill override it)."""
    trained = AblationSpec.from_checkpoint(load_checkpoint(checkpoint)) if checkpoint.suffix != ".h5" else None
    if trained is None and args.keep is None:
        raise ToolkitError(f"--ra {checkpoint} records no ablation (not from MCNN_certify_train.py); pass --keep")
    return cli.ablation_spec(args, trained)


def _evaluate(kind: str, model, attack_root: Path, test_root: Path, args: argparse.Namespace, device: torch.device,
              ablation: AblationSpec | None, gen: torch.Generator) -> dict:
    """Clean and probe-attacked metrics of one model; for RA those of its smoothed count, plus the certificate.
    The probe patches are optimised on crops of `attack_root` (as patch_attack.py, a split other than the test's)."""
    test_set = CrowdDataset.for_model(test_root, model, density=args.density, max_images=args.max_test_images)
    attack_max = args.max_test_images if attack_root == test_root else args.max_train_images
    attack_set = CrowdDataset.for_model(attack_root, model, density=args.density, max_images=attack_max)
    crop = min(args.attack_crop, attack_set.smallest_side() // model.size_multiple * model.size_multiple)
    specs = {side: cli.patch_spec(args, side) for side in args.patch_sizes}
    for spec in specs.values():
        spec.check_fits(crop, "the attack crops")
    attack_set = CrowdDataset.for_model(attack_root, model, density=args.density, crop=crop, max_images=attack_max)
    through = counter = None
    if kind == "ra":  # attacked through an expectation over ablations, counted by the smoothed count
        smoothed = AblationCertifier(ablation, args.attack_samples, generator=gen, eot=args.eot)
        through, counter = partial(smoothed.attack_density, model), partial(smoothed.density, model)
    result = {"attacked": {}, "test_images": len(test_set), "attack_crop": crop,
              "attack_split": "test" if attack_root == test_root else "train"}
    for side, spec in specs.items():
        metrics, _ = attack_metrics(model, attack_set, test_set, spec, device, args.amp, epochs=args.attack_epochs,
                                    restarts=args.restarts, seed=args.seed, attack_through=through, counter=counter)
        result["attacked"][side], result["clean"] = metrics["attacked"], metrics["clean"]
    if kind == "ra":
        # certified for each probe's footprint (rotation, scale and bilinear rim included), at least its side
        certifier = AblationCertifier(ablation, args.samples, args.alpha, generator=gen)
        _, cert = certify_patches(certifier, model, test_set, specs, device, args.amp)
        result.update(clean=cert["counter"], certificate=cert)
    return result


def _table(results: dict, args: argparse.Namespace, keep: int, trained: list[str], synthetic: bool) -> str:
    header = "| model | clean MAE / RMSE | " + " | ".join(f"APAM {s}px MAE / RMSE" for s in args.patch_sizes) + \
        " | RA certificate per patch size: certified fraction, tight-MAE / RMSE |"
    lines = [header, "|" + "---|" * (len(args.patch_sizes) + 3)]
    for kind in KINDS:
        r = results[kind]
        label = LABELS[kind] + (f" (k={keep})" if kind == "ra" else "")
        cells = [f"{m['mae']:.2f} / {m['rmse']:.2f}" for m in (r["clean"], *r["attacked"].values())]
        cert = "; ".join(f"{s}px (as {c['certified_side']}px): {c['certified_fraction']:.0%}"
                         + (f", {c['tight_mae']:.2f} / {c['tight_rmse']:.2f}" if c["certified_fraction"] > 0 else "")
                         for s, c in r.get("certificate", {}).get("patch_sizes", {}).items())
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {cert} |")
    ra = results["ra"]
    note = (f"{args.model}, {plural(ra['test_images'], 'test image')}. Attack: per model and patch size the strongest "
            f"(highest MAE) of {args.restarts} APAM patches (pred-scale, tau 10, {args.patch_shape}), each "
            f"{args.attack_epochs} passes over {ra['attack_crop']}-px crops of the {ra['attack_split']} split; RA "
            f"attacked through {args.eot} ablations per crop and counted by the median of {args.attack_samples}. "
            f"Certificate: {args.samples} samples, alpha {args.alpha}, for a square patch of the side shown in "
            "brackets: the probe's side, or more where its rotation, scale and bilinear rim can change more pixels "
            "than that side squared.")
    if trained:
        how = {"vanilla": VICTIM if synthetic else f"{PLAIN_DEFAULTS['epochs']} epochs",
               "adv": f"{args.adv_epochs} epochs, {args.adv_val_restarts} validation probe(s) per epoch",
               "ra": f"{args.ra_epochs} epochs, {args.ra_warmup_epochs} clean"}
        note += (" Trained here" + (" on the synthetic crowds with short schedules" if synthetic else "") + ": "
                 + ", ".join(f"{k}: {how[k]}" for k in trained) + ".")
    return "\n".join(lines) + "\n\n" + note + "\n"


def main(args: argparse.Namespace) -> dict:
    if not 0 < args.alpha < 1:
        raise ToolkitError(f"--alpha must lie in (0, 1), got {args.alpha}")
    runs.check_out(args, "compare_defenses")
    _check_architectures(args)
    device = pick_device(args.device)
    synthetic = not (args.data or args.train_data or args.test_data)
    for name, value in (SHORT if synthetic else LONG).items():  # the schedules, final before args.json is written
        if getattr(args, name) is None:
            setattr(args, name, value)
    train_root, test_root = cli.resolve_splits(args.data, args.train_data, args.test_data)
    trained = [kind for kind in KINDS if getattr(args, kind) is None]
    if "ra" not in trained:
        _ra_spec(args, args.ra)  # fail now on an RA checkpoint without its ablation
    out = cli.run_dir(args, "compare_defenses", device,
                      data_folders={"train": train_root and str(train_root), "test": str(test_root)})
    checkpoints = {kind: getattr(args, kind) for kind in KINDS}
    for kind in trained:
        checkpoints[kind] = _train(kind, args, checkpoints, train_root or test_root, test_root, synthetic, out, device)
    ablation = _ra_spec(args, checkpoints["ra"])
    gen = torch.Generator(device=device).manual_seed(args.seed)
    results = {}
    for kind in KINDS:
        model = prepare_model(build(args.model, checkpoints[kind]), device).eval()
        results[kind] = {"checkpoint": str(checkpoints[kind]),
                         **_evaluate(kind, model, train_root or test_root, test_root, args, device,
                                     ablation if kind == "ra" else None, gen)}
    table = _table(results, args, ablation.keep, trained, synthetic)
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

"""certify.py: the paper's bound table, a small certification run, bad input."""
import csv
import math
from pathlib import Path

import certify


def test_bound_table_prints_the_paper_values(capsys):
    certify.main(certify.get_args_parser().parse_args(
        ["--bound-table", "--d", "2150400", "--keep", "45", "--patch-sizes", "20", "40", "81", "163"]))
    out = capsys.readouterr().out
    for value in ("0.9752", "0.9043", "0.6611", "0.1827", "1.727e-147", "3.970e-65"):
        assert value in out


def test_certification_writes_intervals_that_contain_the_smoothed_count(tiny_mcnn, tiny_crowds, tmp_path):
    args = certify.get_args_parser().parse_args([
        "--weights", str(tiny_mcnn), "--data", str(tiny_crowds / "test_data"), "--keep", "45", "--samples", "200",
        "--patch-sizes", "4", "24", "--out", str(tmp_path), "--device", "cpu"])
    metrics = certify.main(args)
    small, large = metrics["patch_sizes"]["4"], metrics["patch_sizes"]["24"]
    assert small["certified_fraction"] == 1.0 and math.isfinite(small["tight_mae"])
    assert large["certified_fraction"] == 0.0  # Δ(36864, 1728, 45) = 0.88: a 24 px patch can do anything
    for row in csv.DictReader(open(tmp_path / "per_image.csv")):
        assert float(row["L4"]) <= float(row["count"]) <= float(row["U4"])
    assert (tmp_path / "intervals.png").is_file()


def test_bad_input(tiny_mcnn, tiny_crowds, cli_error, capsys):
    data = str(tiny_crowds / "test_data")
    cases = [
        (["--weights", str(tiny_mcnn), "--data", data, "--alpha", "1.5"], "--alpha must lie in (0, 1)"),
        (["--weights", str(tiny_mcnn), "--data", data, "--samples", "0"], "--samples must be at least 1"),
        (["--weights", str(tiny_mcnn), "--data", data, "--patch-sizes", "200"], "larger than the smallest image"),
        (["--weights", str(tiny_mcnn), "--data", data, "--keep", "999999", "--samples", "2", "--patch-sizes", "4"],
         "keep must lie in"),
        (["--bound-table", "--keep", "45"], "needs --d"),
    ]
    for argv, message in cases:
        code, lines = cli_error(certify, argv)
        errors = [line for line in lines if not line.startswith("warning: ")]  # warnings may precede the error
        assert code == 2 and errors == lines[-1:] and message in lines[-1], (argv, lines)
    certify.main(certify.get_args_parser().parse_args(["--weights", str(tiny_mcnn), "--data", data, "--samples", "2",
                                                       "--patch-sizes", "4", "--max-images", "1", "--out",
                                                       str(Path(tiny_mcnn).parent / "c"), "--device", "cpu"]))
    out, err = capsys.readouterr()
    assert "warning:" not in out  # warnings go to stderr
    assert "was not trained with ablation" in err
    # 2 samples certify nothing at alpha 0.05 even when a patch moves nothing (0.5^n > alpha / 2 below n = 6)
    assert "warning: --samples 2 cannot certify any image at --alpha 0.05" in err and "--samples 6 or more" in err


def test_enough_samples_give_no_warning(capsys):
    from utils.certify import order_statistic_indices

    assert order_statistic_indices(5, 0.0, 0.05) is None and order_statistic_indices(6, 0.0, 0.05) is not None
    certify.main(certify.get_args_parser().parse_args(["--bound-table", "--d", "100000", "--samples", "2"]))
    assert "warning" not in capsys.readouterr().err  # the bound table draws no samples


def test_certify_ablates_as_the_model_was_trained(tiny_ra_pixel, tiny_crowds, tmp_path, ablation_log, capsys):
    argv = ["--weights", str(tiny_ra_pixel / "last.pt"), "--data", str(tiny_crowds / "test_data"), "--samples", "4",
            "--patch-sizes", "4", "--max-images", "1", "--device", "cpu"]
    metrics = certify.main(certify.get_args_parser().parse_args([*argv, "--out", str(tmp_path / "a")]))  # no flags
    assert (metrics["keep"], metrics["unit"], metrics["fill"]) == (300, "pixel", 0.5)
    ablation_log.check(unit="pixel", fill=0.5)
    ablation_log.clear()
    metrics = certify.main(certify.get_args_parser().parse_args([*argv, "--fill", "0.25", "--out",
                                                                 str(tmp_path / "b")]))
    out, err = capsys.readouterr()
    assert "warning: --fill 0.25 overrides the fill 0.5 the model was trained with" in err and "overrides" not in out
    assert metrics["fill"] == 0.25
    ablation_log.check(unit="pixel", fill=0.25)


def test_receptive_field_methods_end_to_end(tiny_mcnn, tiny_crowds, tmp_path):
    argv = ["--weights", str(tiny_mcnn), "--data", str(tiny_crowds / "test_data"), "--patch-sizes", "8", "16",
            "--figures", "1", "--device", "cpu"]
    first = certify.main(certify.get_args_parser().parse_args(
        [*argv, "--method", "rf-mask", "--calibrate", str(tiny_crowds / "train_data"), "--out", str(tmp_path / "a")]))
    assert first["method"] == "rf-mask" and first["counter"] is None  # a counter per side
    assert first["receptive_field"] == {"side": 72, "stride": 4, "offset": -34}
    for s in ("8", "16"):
        m = first["patch_sizes"][s]
        assert m["certified_fraction"] == 1.0 and m["tight_mae"] >= m["mae"] and m["certified_side"] >= int(s)
    assert first["forward_passes_per_image"] == 1
    for row in csv.DictReader(open(tmp_path / "a" / "per_image.csv")):
        assert float(row["L16"]) <= float(row["count16"]) <= float(row["U16"])
    assert len(list((tmp_path / "a" / "figures").iterdir())) == 1
    # the saved calibration, reused, gives the same certificate; rf-clip reuses it too
    again = certify.main(certify.get_args_parser().parse_args(
        [*argv, "--method", "rf-mask", "--calibration", str(tmp_path / "a" / "calibration.json"), "--out",
         str(tmp_path / "b")]))
    assert again["patch_sizes"] == first["patch_sizes"]
    clip = certify.main(certify.get_args_parser().parse_args(
        [*argv, "--method", "rf-clip", "--calibration", str(tmp_path / "a" / "calibration.json"), "--out",
         str(tmp_path / "c")]))
    assert clip["counter"]["mae"] >= 0 and clip["dmax"] > 0


def test_receptive_field_bad_input(tiny_mcnn, tiny_crowds, tmp_path, cli_error):
    from models import build
    from models.weights import checkpoint_state
    from utils.io import save_checkpoint
    from utils.rf_certify import Calibration

    danet = save_checkpoint(tmp_path / "danet.pt", checkpoint_state(build("danet")))
    (tmp_path / "empty" / "images").mkdir(parents=True)
    constant = Calibration(0.1, {11: 1.0}).save(tmp_path / "constant.json")  # an rf-mask refill of a = 1
    base = ["--data", str(tiny_crowds / "test_data"), "--patch-sizes", "8", "--out", str(tmp_path / "x")]
    calibrate = ["--calibrate", str(tiny_crowds / "train_data")]
    cases = [
        (["--model", "danet", "--weights", str(danet), "--method", "rf-mask", *calibrate, *base],
         "danet has no bounded receptive field: its deformable convolutions"),
        (["--weights", str(tiny_mcnn), "--method", "rf-mask", "--calibrate", str(tmp_path / "empty"), *base],
         "holds no images"),
        (["--weights", str(tiny_mcnn), "--method", "rf-clip", *calibrate, *base[:-3], "200", *base[-2:]],
         "patch side 200 is larger than the smallest image side"),
        (["--weights", str(tiny_mcnn), "--method", "rf-mask", *base], "needs dmax and c: --calibrate SPLIT"),
        (["--weights", str(tiny_mcnn), "--method", "rf-guess", *base], "argument --method: invalid choice"),
        (["--weights", str(tiny_mcnn), "--method", "rf-mask", "--calibration", str(constant), "--refill", "fitted",
          *base], f"--refill fitted contradicts {constant} (refill constant)"),
    ]
    for argv, message in cases:
        code, lines = cli_error(certify, argv)
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, lines)
    assert not (tmp_path / "x").exists()

"""certify.py: the paper's bound table, a small certification run, bad input."""
import csv
import math
import subprocess
import sys
from pathlib import Path

import certify

REPO = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "certify.py", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_bound_table_prints_the_paper_values():
    result = _run("--bound-table", "--d", "2150400", "--keep", "45", "--patch-sizes", "20", "40", "81", "163")
    assert result.returncode == 0, result.stderr
    for value in ("0.9752", "0.9043", "0.6611", "0.1827", "1.727e-147", "3.970e-65"):
        assert value in result.stdout


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
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, lines)
    certify.main(certify.get_args_parser().parse_args(["--weights", str(tiny_mcnn), "--data", data, "--samples", "2",
                                                       "--patch-sizes", "4", "--max-images", "1", "--out",
                                                       str(Path(tiny_mcnn).parent / "c"), "--device", "cpu"]))
    assert "was not trained with ablation" in capsys.readouterr().out


def test_certify_ablates_as_the_model_was_trained(tiny_ra_pixel, tiny_crowds, tmp_path, ablation_log, capsys):
    argv = ["--weights", str(tiny_ra_pixel / "last.pt"), "--data", str(tiny_crowds / "test_data"), "--samples", "4",
            "--patch-sizes", "4", "--max-images", "1", "--device", "cpu"]
    metrics = certify.main(certify.get_args_parser().parse_args([*argv, "--out", str(tmp_path / "a")]))  # no flags
    assert (metrics["keep"], metrics["unit"], metrics["fill"]) == (300, "pixel", 0.5)
    ablation_log.check(unit="pixel", fill=0.5)
    ablation_log.clear()
    metrics = certify.main(certify.get_args_parser().parse_args([*argv, "--fill", "0.25", "--out",
                                                                 str(tmp_path / "b")]))
    assert "--fill 0.25 overrides the fill 0.5 the model was trained with" in capsys.readouterr().out
    assert metrics["fill"] == 0.25
    ablation_log.check(unit="pixel", fill=0.25)

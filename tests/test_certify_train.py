"""MCNN_certify_train.py: the run folder, resume, and bad input; certify.py accepts its checkpoints."""
import csv
import math
import subprocess
import sys
from pathlib import Path

import MCNN_certify_train as script
from utils.io import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_run_logs_clean_ablated_and_smoothed_validation(tiny_ra_mcnn):
    log = list(csv.DictReader(open(tiny_ra_mcnn / "log.csv")))
    assert [int(r["epoch"]) for r in log] == list(range(1, 7))
    assert all(math.isnan(float(r["mae"])) for r in log[:2])  # warm-up: clean validation only
    assert all(math.isfinite(float(r[k])) for r in log[2:] for k in ("mae", "ablated_mae", "clean_mae"))
    best = load_checkpoint(tiny_ra_mcnn / "best.pt")
    assert best["args"]["keep"] == 45 and best["epoch"] >= 2  # picked on the smoothed MAE, after warm-up


def test_resume_continues_with_ablation(tiny_ra_mcnn, tiny_crowds, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_ra_mcnn, out)
    args = ["--data", str(tiny_crowds), "--out", str(out), "--crop", "64", "--batch-size", "2", "--epochs", "7",
            "--warmup-epochs", "2", "--keep", "45", "--val-samples", "3", "--device", "cpu", "--resume"]
    summary = script.main(script.get_args_parser().parse_args(args))
    log = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in log] == list(range(1, 8)) and math.isfinite(summary["mae"])
    assert load_checkpoint(out / "last.pt")["epoch"] == 6


def test_certify_accepts_the_checkpoint_without_warning(tiny_ra_mcnn, tiny_crowds, tmp_path):
    result = subprocess.run([sys.executable, "certify.py", "--weights", str(tiny_ra_mcnn / "best.pt"), "--data",
                             str(tiny_crowds / "test_data"), "--keep", "45", "--samples", "100", "--patch-sizes", "4",
                             "--out", str(tmp_path), "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr and "certified" in result.stdout


def test_bad_input_gives_one_line(tiny_crowds, tmp_path, cli_error):
    cases = [(["--warmup-epochs", "-1"], "warm-up epochs must be at least 0"),
             (["--keep", "0"], "--keep: must be a positive integer"),
             (["--unit", "row"], "--unit: invalid choice")]
    for extra, message in cases:
        code, lines = cli_error(script, ["--data", str(tiny_crowds), "--out", str(tmp_path), "--epochs", "1",
                                         "--crop", "64", "--device", "cpu", *extra])
        assert code != 0 and len(lines) == 1 and message in lines[0], (extra, lines)

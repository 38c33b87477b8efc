"""train.py: a short run, resume after SIGKILL, bad input; the slow test checks the synthetic default."""
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from utils.io import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "mcnn", "--data", str(data), "--out", str(out), "--crop", "32", "--batch-size", "3",
            "--device", "cpu", *extra]


def _log(out: Path) -> list[dict]:
    path = out / "log.csv"
    return list(csv.DictReader(open(path))) if path.is_file() else []


def test_short_run_writes_the_run_folder(tiny_crowds, tmp_path):
    summary = train.main(train.get_args_parser().parse_args(_argv(tiny_crowds, tmp_path, "--epochs", "2")))
    for name in ("args.json", "metrics.json", "log.csv", "last.pt", "best.pt", "per_image.csv", "curves.png"):
        assert (tmp_path / name).is_file(), name
    assert [int(r["epoch"]) for r in _log(tmp_path)] == [1, 2]
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["model"] == "mcnn" and state["epoch"] == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["mae"] == pytest.approx(summary["mae"])


def test_sigkill_then_resume_continues_from_the_last_epoch(tiny_crowds, tmp_path):
    cmd = [sys.executable, "train.py", *_argv(tiny_crowds, tmp_path, "--epochs", "40")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(_log(tmp_path)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _log(tmp_path)
    assert 2 <= len(before) < 40, "the run should have been killed mid-way"
    killed_at = load_checkpoint(tmp_path / "last.pt")["epoch"]  # complete: never half-written

    weights = load_checkpoint(tmp_path / "last.pt")["state_dict"]
    resumed = subprocess.run([*cmd[:-2], "--epochs", str(killed_at + 3), "--resume"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'last.pt'} at epoch {killed_at + 2}" in resumed.stdout
    after = _log(tmp_path)
    assert [int(r["epoch"]) for r in after] == list(range(1, killed_at + 4))
    kept = min(len(before), killed_at + 1)  # log.csv is written just after last.pt
    assert after[:kept] == before[:kept]  # history carried over, not retrained
    final = load_checkpoint(tmp_path / "last.pt")
    assert final["epoch"] == killed_at + 2
    assert any(not torch.equal(final["state_dict"][k], weights[k]) for k in weights)


def test_bad_input_gives_one_line(tiny_crowds, tmp_path, cli_error):
    cases = [
        (_argv(tiny_crowds, tmp_path / "a", "--resume"), "nothing to resume"),
        (_argv(tmp_path / "nowhere", tmp_path / "b"), "data split not found"),
        (_argv(tiny_crowds, tmp_path / "c", "--crop", "30"), "crop must be a positive multiple of 4"),
        (["--model", "vgg", "--data", str(tiny_crowds)], "unknown model"),
        (["--epochs", "0"], "--epochs: must be a positive integer"),
        (["--crop", "-8"], "--crop: must be a positive integer"),
    ]
    for argv, message in cases:
        code, lines = cli_error(train, argv)
        assert code != 0 and len(lines) == 1 and message in lines[0], (argv, lines)


@pytest.mark.slow
def test_default_run_beats_the_mean_count_baseline(tmp_path):
    """The acceptance run: `python train.py --model mcnn` on the synthetic default, MAE <= 0.3 x baseline."""
    start = time.time()
    summary = train.main(train.get_args_parser().parse_args(["--model", "mcnn", "--out", str(tmp_path)]))
    assert summary["mae"] <= 0.3 * summary["baseline_mae"], summary
    print(f"default MCNN run: {time.time() - start:.0f} s, {summary}")

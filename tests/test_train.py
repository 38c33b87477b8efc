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
from models import build
from models.receptive_field import receptive_field
from utils import runtime
from utils.errors import ToolkitError
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


def test_metrics_describe_the_checkpoint_of_per_image_csv_and_args_record_what_ran(tiny_crowds, tmp_path):
    summary = train.main(train.get_args_parser().parse_args(_argv(tiny_crowds, tmp_path, "--epochs", "3")))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    log = _log(tmp_path)
    best = min(log, key=lambda r: float(r["mae"]))  # log.csv: the validation figures of every epoch
    assert saved["checkpoint"] == "best.pt" and saved["best_epoch"] == int(best["epoch"])
    assert saved["best_epoch"] == load_checkpoint(tmp_path / "best.pt")["epoch"] + 1
    assert saved["validation"]["mae"] == pytest.approx(float(best["mae"]))
    # the top-level figures are best.pt's on the test split, and so is per_image.csv; the last epoch's under "last"
    rows = list(csv.DictReader(open(tmp_path / "per_image.csv")))
    assert len(rows) == saved["test_images"] == 3
    per_image_mae = sum(abs(float(r["pred"]) - float(r["gt"])) for r in rows) / len(rows)
    assert saved["mae"] == pytest.approx(per_image_mae, rel=1e-5)
    assert saved["bias"] == pytest.approx(sum(float(r["pred"]) - float(r["gt"]) for r in rows) / len(rows), rel=1e-5)
    assert "rmse" in saved and "mse" not in saved
    assert saved["last"]["epoch"] == 3 and saved["last"]["mae"] == pytest.approx(float(log[-1]["mae"]))
    assert saved["mae_over_baseline"] == pytest.approx(saved["mae"] / saved["baseline_mae"])
    assert summary["mae"] == saved["mae"]
    record = json.loads((tmp_path / "args.json").read_text())
    assert record["device"] == "cpu" and record["amp"] is False and record["dtype"] == "float32"  # no autocast
    # --val 0.1 of the 6 training images: one held out, drawn by --seed, listed in args.json
    assert record["val"] == 0.1 and record["val_images"] == saved["validation"]["images"] and len(
        record["val_images"]) == 1 and saved["train_images"] == 5


def test_bfloat16_autocast_trains_on_the_cpu_and_is_recorded(tiny_crowds, tmp_path):
    summary = train.main(train.get_args_parser().parse_args(_argv(tiny_crowds, tmp_path, "--epochs", "1",
                                                                   "--amp-dtype", "bfloat16")))
    record = json.loads((tmp_path / "args.json").read_text())
    assert record["amp"] is True and record["dtype"] == "bfloat16 autocast"
    assert runtime.autocasts(torch.device("cpu")) and summary["mae"] == summary["mae"]  # configured; finite


def test_the_count_loss_is_recorded_and_changes_training(tiny_crowds, tmp_path):
    plain = train.main(train.get_args_parser().parse_args(_argv(tiny_crowds, tmp_path / "plain", "--epochs", "1")))
    counted = train.main(train.get_args_parser().parse_args(_argv(tiny_crowds, tmp_path / "count", "--epochs", "1",
                                                                   "--count-loss", "0.5")))
    assert json.loads((tmp_path / "count" / "args.json").read_text())["count_loss"] == 0.5
    assert float(_log(tmp_path / "count")[0]["loss"]) > float(_log(tmp_path / "plain")[0]["loss"])
    assert plain["mae"] != counted["mae"]


def test_dense_crops_and_scales_are_recorded_and_dense_crops_drawn_around_heads(tiny_crowds, tmp_path, monkeypatch):
    made, real_fit = [], train.fit

    def fit(model, train_set, val_set, *args, **kwargs):
        assert val_set.dense == 0.0 and val_set.scales is None and val_set.crop is None  # whole images, as a test split
        made.append(train_set)
        return real_fit(model, train_set, val_set, *args, **kwargs)

    monkeypatch.setattr(train, "fit", fit)
    for share in ("0", "1"):
        train.main(train.get_args_parser().parse_args(_argv(tiny_crowds, tmp_path / share, "--epochs", "1",
                                                             "--dense-crops", share)))
        assert json.loads((tmp_path / share / "args.json").read_text())["dense_crops"] == float(share)
    uniform, dense = made
    assert (uniform.dense, dense.dense) == (0.0, 1.0) and uniform.names == dense.names
    counts = {}
    for part in made:  # the crops of 20 epochs: drawn around heads, they hold more of them
        counts[part.dense] = []
        for epoch in range(20):
            part.set_epoch(epoch)
            counts[part.dense] += [part[i][2] for i in range(len(part))]
    assert min(counts[1.0]) > 0 and min(counts[0.0]) == 0
    assert sum(counts[1.0]) > 1.2 * sum(counts[0.0])
    made.clear()
    train.main(train.get_args_parser().parse_args(_argv(tiny_crowds, tmp_path / "scaled", "--epochs", "1",
                                                         "--scales", "0.7", "1.4")))
    assert json.loads((tmp_path / "scaled" / "args.json").read_text())["scales"] == [0.7, 1.4]
    assert made[0].scales == (0.7, 1.4) and made[0][0][0].shape[-1] == made[0].crop


def test_the_architecture_is_recorded_and_its_checkpoints_rebuild_themselves(tiny_crowds, tmp_path):
    argv = _argv(tiny_crowds, tmp_path / "w8", "--epochs", "1", "--width", "8", "--blocks", "2", "--no-batch-norm")
    train.main(train.get_args_parser().parse_args([*argv[:1], "smallfield", *argv[2:]]))
    record = json.loads((tmp_path / "w8" / "args.json").read_text())
    assert (record["width"], record["blocks"], record["norm"]) == (8, 2, False)
    assert load_checkpoint(tmp_path / "w8" / "best.pt")["model_kwargs"] == {"width": 8, "blocks": 2, "norm": False}
    model = build("smallfield", tmp_path / "w8" / "best.pt")  # no options given: the checkpoint's own
    assert model.net.features[0][0].out_channels == 8
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert receptive_field(model.eval()).side == 33 + 16  # one block beyond the first
    with pytest.raises(ToolkitError, match="mcnn has no option width"):
        train.main(train.get_args_parser().parse_args(_argv(tiny_crowds, tmp_path / "bad", "--width", "8")))
    assert not (tmp_path / "bad").exists()
    again = _argv(tiny_crowds, tmp_path / "again", "--width", "8", "--weights", str(tmp_path / "w8" / "best.pt"))
    with pytest.raises(ToolkitError, match="keep the architecture they were trained with: leave out --width, which"):
        train.main(train.get_args_parser().parse_args([*again[:1], "smallfield", *again[2:]]))
    assert not (tmp_path / "again").exists()
    deeper = _argv(tiny_crowds, tmp_path / "deeper", "--epochs", "1", "--blocks", "3", "--weights",
                   str(tmp_path / "w8" / "best.pt"))  # blocks may be added to weights: each starts as the identity
    train.main(train.get_args_parser().parse_args([*deeper[:1], "smallfield", *deeper[2:]]))
    assert load_checkpoint(tmp_path / "deeper" / "best.pt")["model_kwargs"] == {"width": 8, "blocks": 3, "norm": False}


def _weights(out: Path) -> dict:
    return load_checkpoint(out / "last.pt")["state_dict"]


def test_sigkill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tiny_crowds, tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    cmd = [sys.executable, "train.py", *_argv(tiny_crowds, killed, "--epochs", "6")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(_log(killed)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _log(killed)
    assert 2 <= len(before) < 6, "the run should have been killed mid-way"
    killed_at = load_checkpoint(killed / "last.pt")["epoch"]  # complete: never half-written

    # no flag but --out: every setting (data, crop, epochs, seed...) comes from the run's record
    resumed = subprocess.run([sys.executable, "train.py", "--out", str(killed), "--resume"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {killed / 'last.pt'} at epoch {killed_at + 2}" in resumed.stdout
    after = _log(killed)
    assert [int(r["epoch"]) for r in after] == list(range(1, 7))
    kept = min(len(before), killed_at + 1)  # log.csv is written just after last.pt
    assert after[:kept] == before[:kept]  # history carried over, not retrained

    train.main(train.get_args_parser().parse_args(_argv(tiny_crowds, whole, "--epochs", "6")))
    resumed_weights, whole_weights = _weights(killed), _weights(whole)
    assert all(torch.equal(resumed_weights[k], whole_weights[k]) for k in whole_weights)
    assert _log(killed) == _log(whole)


def test_sigterm_keeps_last_pt_and_says_how_to_resume(tiny_crowds, tmp_path):
    """SIGTERM (what `timeout` and schedulers send) is handled as Ctrl-C: the run keeps its checkpoint and says how
    to continue; exit status 143."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *_argv(tiny_crowds, out, "--epochs", "100000")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "last.pt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == (f"train.py: terminated (SIGTERM); continue with: python train.py --out "
                                            f"{out} --resume")
    assert load_checkpoint(out / "last.pt")["epoch"] >= 0 and (out / "args.json").is_file()


def test_interrupted_run_says_how_to_resume_and_resumes_exactly(tiny_crowds, tmp_path, monkeypatch, capsys):
    from utils import cli, training

    broken, whole = tmp_path / "broken", tmp_path / "whole"
    real = training.train_one_epoch

    def interrupt_third_epoch(*a, desc="", **k):
        if desc == "epoch 3":
            raise KeyboardInterrupt
        return real(*a, desc=desc, **k)

    monkeypatch.setattr(training, "train_one_epoch", interrupt_third_epoch)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.main, train.get_args_parser(), _argv(tiny_crowds, broken, "--epochs", "4"))
    assert exit_info.value.code == 130
    assert f"interrupted; continue with: python train.py --out {broken} --resume" in capsys.readouterr().err
    monkeypatch.setattr(training, "train_one_epoch", real)

    train.main(train.get_args_parser().parse_args(["--out", str(broken), "--resume"]))
    train.main(train.get_args_parser().parse_args(_argv(tiny_crowds, whole, "--epochs", "4")))
    resumed_weights, whole_weights = _weights(broken), _weights(whole)
    assert all(torch.equal(resumed_weights[k], whole_weights[k]) for k in whole_weights)


def test_resume_refuses_contradicting_flags_and_records_a_longer_run(tiny_crowds, tmp_path, cli_error):
    train.main(train.get_args_parser().parse_args(_argv(tiny_crowds, tmp_path, "--epochs", "2",
                                                        "--max-test-images", "2")))
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for flag, value, recorded in (("--max-test-images", "3", "2"), ("--lr", "0.01", "0.001"), ("--epochs", "1", "2"),
                                  ("--crop", "64", "32")):
        code, lines = cli_error(train, ["--out", str(tmp_path), "--resume", flag, value])
        assert code == 2 and len(lines) == 1, lines
        assert f"{flag} {value} contradicts the run being resumed ({flag} {recorded} in" in lines[0], lines
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files

    # the same values again are no contradiction; a longer --epochs extends the run and is recorded
    summary = train.main(train.get_args_parser().parse_args(_argv(tiny_crowds, tmp_path, "--epochs", "3",
                                                                  "--max-test-images", "2", "--resume")))
    assert summary["epochs"] == 3 and summary["test_images"] == 2
    record = json.loads((tmp_path / "args.json").read_text())
    assert record["epochs"] == 3 and [r["epochs"] for r in record["resumes"]] == [3]
    assert load_checkpoint(tmp_path / "last.pt")["args"]["epochs"] == 3


def test_no_test_leaves_the_test_split_unscored_also_when_the_run_is_resumed(tiny_crowds, tmp_path):
    summary = train.main(train.get_args_parser().parse_args(_argv(tiny_crowds, tmp_path, "--epochs", "1",
                                                                  "--no-test")))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert not (tmp_path / "per_image.csv").exists()
    assert "mae" not in saved and "test_images" not in saved and summary["validation"]["mae"] >= 0
    assert saved["checkpoint"] == "best.pt" and json.loads((tmp_path / "args.json").read_text())["score_test"] is False
    # a candidate resumed with no flags stays a candidate: its test split unscored
    summary = train.main(train.get_args_parser().parse_args(["--out", str(tmp_path), "--resume", "--epochs", "2"]))
    assert "test_images" not in summary and not (tmp_path / "per_image.csv").exists()
    assert json.loads((tmp_path / "args.json").read_text())["score_test"] is False


def test_a_run_that_scores_the_test_split_may_be_resumed_with_no_test(tiny_crowds, tmp_path):
    train.main(train.get_args_parser().parse_args(_argv(tiny_crowds, tmp_path, "--epochs", "1")))
    (tmp_path / "per_image.csv").unlink()
    summary = train.main(train.get_args_parser().parse_args(["--out", str(tmp_path), "--resume", "--epochs", "2",
                                                             "--no-test"]))
    assert "test_images" not in summary and not (tmp_path / "per_image.csv").exists()


def test_a_run_from_before_the_validation_part_resumes_on_its_whole_train_split(tiny_crowds, tmp_path, cli_error):
    import torch

    train.main(train.get_args_parser().parse_args(_argv(tiny_crowds, tmp_path, "--epochs", "1", "--val", "0")))
    state = load_checkpoint(tmp_path / "last.pt")
    del state["args"]["val"]  # as a run of the version before --val recorded it
    torch.save(state, tmp_path / "last.pt")
    code, lines = cli_error(train, ["--out", str(tmp_path), "--resume", "--epochs", "2", "--val", "0.2"])
    assert code == 2 and "--val 0.2 contradicts the run being resumed (--val 0.0 in" in lines[0], lines
    summary = train.main(train.get_args_parser().parse_args(["--out", str(tmp_path), "--resume", "--epochs", "2"]))
    assert summary["train_images"] == 6 and summary["validation"] is None and summary["checkpoint"] == "last.pt"


def test_a_run_from_before_the_crop_and_architecture_flags_refuses_them_on_resume(tiny_crowds, tmp_path, cli_error):
    argv = _argv(tiny_crowds, tmp_path, "--epochs", "1")
    train.main(train.get_args_parser().parse_args([*argv[:1], "smallfield", *argv[2:]]))
    state = load_checkpoint(tmp_path / "last.pt")
    for key in ("dense_crops", "width", "blocks", "norm", "ema", "scales"):  # as a version before them recorded it
        del state["args"][key]
    torch.save(state, tmp_path / "last.pt")
    for flags, message in [(["--dense-crops", "0.5"], "--dense-crops 0.5 contradicts the run being resumed"),
                           (["--ema", "0.9"], "--ema 0.9 contradicts the run being resumed"),
                           (["--scales", "0.7", "1.4"], "contradicts the run being resumed"),
                           (["--blocks", "2"], "--blocks 2 contradicts the run being resumed"),
                           (["--no-batch-norm"], "contradicts the run being resumed")]:
        code, lines = cli_error(train, ["--out", str(tmp_path), "--resume", "--epochs", "2", *flags])
        assert code == 2 and len(lines) == 1 and message in lines[0], lines
    summary = train.main(train.get_args_parser().parse_args(["--out", str(tmp_path), "--resume", "--epochs", "2"]))
    assert summary["epochs"] == 2


def test_bad_input_gives_one_line(tiny_crowds, tmp_path, cli_error):
    cases = [
        (_argv(tiny_crowds, tmp_path / "a", "--resume"), "nothing to resume"),
        (_argv(tiny_crowds, tmp_path / "a", "--resume", "--overwrite"), "give one of them"),
        (_argv(tmp_path / "nowhere", tmp_path / "b"), "data split not found"),
        (_argv(tiny_crowds, tmp_path / "c", "--crop", "30"), "crop must be a positive multiple of 4"),
        (["--model", "vgg", "--data", str(tiny_crowds)], "argument --model: invalid choice: 'vgg'"),
        (["--epochs", "0"], "--epochs: must be a positive integer"),
        (["--crop", "-8"], "--crop: must be a positive integer"),
        (_argv(tiny_crowds, tmp_path / "d", "--crop", "256"), "crop 256 is larger than every image of"),
        (_argv(tiny_crowds, tmp_path / "e", "--workers", "-1"), "--workers: must be a non-negative integer"),
        (_argv(tiny_crowds, tmp_path / "f", "--val", "1"), "--val: must lie in [0, 1), got 1"),
        (_argv(tiny_crowds, tmp_path / "g", "--val", "0.95"), "leaves none to train on"),
        (_argv(tiny_crowds, tmp_path / "h", "--dense-crops", "1.5"), "--dense-crops: must lie in [0, 1], got 1.5"),
        (_argv(tiny_crowds, tmp_path / "i", "--scales", "1.4", "0.7"), "scales must be two numbers 0 < low <= high"),
        (_argv(tiny_crowds, tmp_path / "j", "--scales", "0", "1"), "--scales: must be positive, got 0"),
        (_argv(tiny_crowds, tmp_path / "k", "--ema", "1"), "--ema: must lie in [0, 1), got 1"),
    ]
    for argv, message in cases:
        code, lines = cli_error(train, argv)
        assert code != 0 and len(lines) == 1 and message in lines[0], (argv, lines)
    assert not any((tmp_path / name).exists() for name in "dijk")  # refused before the run folder is claimed


@pytest.mark.slow
def test_default_run_beats_the_mean_count_baseline(tmp_path):
    """The acceptance run: `python train.py --model mcnn` on the synthetic default, MAE <= 0.3 x baseline."""
    start = time.time()
    summary = train.main(train.get_args_parser().parse_args(["--model", "mcnn", "--out", str(tmp_path)]))
    assert summary["mae"] <= 0.3 * summary["baseline_mae"], summary
    print(f"default MCNN run: {time.time() - start:.0f} s, {summary}")

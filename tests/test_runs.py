"""Run folders (utils/runs.py) and the scripts that use them: no run lands on another, bad input leaves nothing
behind, args.json says what the run did."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import certify
import compare_defenses
import evaluate
import get_ablated_img
import MCNN_adv_train
import MCNN_certify_train
import patch_attack
import train
from utils import cli, runs
from utils.errors import ToolkitError
from utils.runtime import pick_device

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


# --- the library -------------------------------------------------------------------------------------------------

def test_a_new_run_records_its_settings_environment_and_mode(tmp_path):
    args = argparse.Namespace(out=tmp_path / "a" / "run", seed=3, data=tmp_path, _given=frozenset({"seed"}))
    out = runs.start(args, "train", {"dtype": "float32"})
    record = json.loads((out / "args.json").read_text())
    assert record["seed"] == 3 and record["data"] == str(tmp_path) and record["dtype"] == "float32"
    assert "_given" not in record and record["script"] == "train"
    env = record["environment"]
    import numpy
    import torch
    import torchvision
    assert (env["torch"], env["torchvision"], env["numpy"]) == (torch.__version__, torchvision.__version__,
                                                                numpy.__version__)
    assert env["git_commit"] is None or len(env["git_commit"].split("+")[0]) == 40
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "args.json").stat().st_mode & 0o777 == 0o666 & ~umask  # like any normal file, not 0600


def test_an_existing_run_is_refused_and_overwrite_starts_it_again(tmp_path, capsys):
    out = tmp_path / "run"
    runs.start(argparse.Namespace(out=out, seed=0), "train")
    (out / "best.pt").write_bytes(b"weights")
    files = _files(out)
    with pytest.raises(ToolkitError, match="already holds a run: --resume continues it, --overwrite starts it again"):
        runs.start(argparse.Namespace(out=out, seed=1, resume=False), "train")
    with pytest.raises(ToolkitError, match="already holds a run: --overwrite starts it again") as refused:
        runs.start(argparse.Namespace(out=out, seed=1), "evaluate")  # a script without --resume is not offered it
    assert "--resume" not in str(refused.value)
    assert _files(out) == files
    runs.start(argparse.Namespace(out=out, seed=1, overwrite=True), "train")
    assert "--overwrite: deleting the earlier run in" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["args.json"]
    assert json.loads((out / "args.json").read_text())["seed"] == 1


def test_folders_that_are_not_runs_are_never_taken(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ToolkitError, match="not empty and holds no run"):
        runs.start(argparse.Namespace(out=tmp_path / "notes", overwrite=True), "train")
    with pytest.raises(ToolkitError, match="is a file, not a folder"):
        runs.start(argparse.Namespace(out=tmp_path / "afile"), "train")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert runs.start(argparse.Namespace(out=tmp_path / "empty"), "train") == tmp_path / "empty"


def test_default_folders_never_collide(tmp_path):
    first = runs.start(argparse.Namespace(out=None), "train")
    second = runs.start(argparse.Namespace(out=None), "train")  # the same second: a suffix, not the same folder
    assert first != second and first.parent == second.parent == Path("runs") / "train"
    assert (first / "args.json").is_file() and (second / "args.json").is_file()


def test_a_failed_run_is_discarded_with_the_folders_made_for_it(tmp_path):
    runs.start(argparse.Namespace(out=tmp_path / "new" / "deep" / "run"), "train")
    assert runs.discard_failed()
    assert not (tmp_path / "new").exists()
    # results written before the failure (calibration.json, figures/...) go too: a run is complete or absent
    runs.start(argparse.Namespace(out=tmp_path / "certify"), "certify")
    (tmp_path / "certify" / "calibration.json").write_text("{}")
    (tmp_path / "certify" / "figures").mkdir()
    (tmp_path / "certify" / "figures" / "a.png").write_bytes(b"png")
    assert runs.discard_failed() and not (tmp_path / "certify").exists()
    # a folder that existed (empty, or an earlier run deleted by --overwrite) is emptied, not removed
    (tmp_path / "mine").mkdir()
    runs.start(argparse.Namespace(out=tmp_path / "mine"), "evaluate")
    (tmp_path / "mine" / "per_image.csv").write_text("x")
    assert runs.discard_failed() and (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    # kept: a run holding a checkpoint to resume (also in a subfolder, as compare_defenses trains), a resumed run
    for sub in ("", "adv"):
        runs.start(argparse.Namespace(out=tmp_path / f"done{sub}"), "train")
        (tmp_path / f"done{sub}" / sub).mkdir(exist_ok=True)
        (tmp_path / f"done{sub}" / sub / "last.pt").write_bytes(b"work")
        assert not runs.discard_failed()
        assert (tmp_path / f"done{sub}" / sub / "last.pt").is_file()
    # kept: a comparison holding rows it saved (compare_defenses.py --resume reuses them)
    runs.start(argparse.Namespace(out=tmp_path / "table"), "compare_defenses")
    (tmp_path / "table" / "rows").mkdir()
    (tmp_path / "table" / "rows" / "mcnn.json").write_text("{}")
    assert not runs.discard_failed() and (tmp_path / "table" / "rows" / "mcnn.json").is_file()
    (tmp_path / "done" / "last.pt").unlink()  # a resumed run whose last.pt is gone still keeps its earlier files
    runs.start(argparse.Namespace(out=tmp_path / "done", resume=True), "train")
    assert not runs.discard_failed() and (tmp_path / "done" / "args.json").is_file()


def test_check_out_refuses_what_start_refuses_and_creates_nothing(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    runs.start(argparse.Namespace(out=tmp_path / "earlier", resume=False), "train")
    before = _tree(tmp_path)
    for args, message in (
            (argparse.Namespace(out=tmp_path / "afile"), "is a file, not a folder"),
            (argparse.Namespace(out=tmp_path / "afile" / "run"), f"{tmp_path / 'afile'} is a file"),
            (argparse.Namespace(out=tmp_path / "notes"), "not empty and holds no run"),
            (argparse.Namespace(out=tmp_path / "earlier", resume=False),
             "already holds a run: --resume continues it, --overwrite starts it again"),
            (argparse.Namespace(out=tmp_path / "earlier"), "already holds a run: --overwrite starts it again"),
            (argparse.Namespace(out=tmp_path / "notes", resume=True), "holds no args.json")):
        with pytest.raises(ToolkitError, match=message):
            runs.check_out(args, "train")
    for good in (argparse.Namespace(out=tmp_path / "new" / "run"), argparse.Namespace(out=None),
                 argparse.Namespace(out=tmp_path / "earlier", overwrite=True)):
        runs.check_out(good, "train")
    assert _tree(tmp_path) == before  # checked, not claimed: nothing created, nothing deleted


def test_under_torchrun_only_rank_0_checks_the_run_folder(tmp_path, monkeypatch):
    earlier = tmp_path / "earlier"  # as rank 0 may have claimed it already when another rank reaches its check
    runs.start(argparse.Namespace(out=earlier, resume=False), "train")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    runs.check_out(argparse.Namespace(out=earlier, resume=False), "train")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ToolkitError, match="already holds a run"):
        runs.check_out(argparse.Namespace(out=earlier, resume=False), "train")


def test_check_out_refuses_an_unwritable_parent(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root may write anywhere: stand in for a folder it may not write to (a read-only mount)
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and access(path, mode))
    with pytest.raises(ToolkitError, match="locked is not writable"):
        runs.check_out(argparse.Namespace(out=tmp_path / "locked" / "a" / "run"), "train")
    with pytest.raises(ToolkitError, match="locked is not writable"):
        runs.claim_file(tmp_path / "locked" / "x.png", (".png",))


def test_claim_file(tmp_path):
    (tmp_path / "old.png").write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    for path, message in ((tmp_path / "dir", "is a folder"), (tmp_path / "x.jpg", "must end in .png"),
                          (tmp_path / "old.png", "already exists")):
        with pytest.raises(ToolkitError, match=message):
            runs.claim_file(path, (".png",))
    assert runs.claim_file(tmp_path / "old.png", (".png",), overwrite=True) == tmp_path / "old.png"


# --- every script --------------------------------------------------------------------------------------------------

def _script_argv(tiny_crowds: Path, tiny_mcnn: Path) -> dict:
    """Valid, quick arguments of each run-folder script on the tiny crowds (the --out is added by the test)."""
    data, test = ["--data", str(tiny_crowds)], str(tiny_crowds / "test_data")
    fast = ["--epochs", "1", "--crop", "64", "--batch-size", "2", "--device", "cpu"]
    return {
        train: [*data, *fast],
        MCNN_certify_train: [*data, *fast, "--warmup-epochs", "0", "--val-samples", "2"],
        MCNN_adv_train: [*data, *fast, "--weights", str(tiny_mcnn), "--patch-size", "16", "--val-attack-epochs", "1",
                         "--val-attack-restarts", "1"],
        evaluate: ["--weights", str(tiny_mcnn), "--data", test, "--device", "cpu", "--figures", "0"],
        patch_attack: [*data, "--weights", str(tiny_mcnn), "--epochs", "1", "--patch-size", "16", "--figures", "0",
                       "--device", "cpu"],
        certify: ["--weights", str(tiny_mcnn), "--data", test, "--samples", "2", "--patch-sizes", "4",
                  "--device", "cpu"],
        compare_defenses: [*data, "--vanilla", str(tiny_mcnn), "--adv", str(tiny_mcnn), "--ra", str(tiny_mcnn),
                           "--keep", "45", "--patch-sizes", "8", "--device", "cpu"],
    }


def test_no_script_runs_over_an_existing_run(tiny_crowds, tiny_mcnn, tmp_path, cli_error):
    earlier = tmp_path / "earlier"
    train.main(train.get_args_parser().parse_args(["--data", str(tiny_crowds), "--out", str(earlier), "--epochs", "1",
                                                   "--crop", "32", "--batch-size", "3", "--device", "cpu"]))
    files = _files(earlier)
    assert {"args.json", "last.pt", "metrics.json", "log.csv"} <= {p.name for p in files}
    for script, argv in _script_argv(tiny_crowds, tiny_mcnn).items():
        code, lines = cli_error(script, [*argv, "--out", str(earlier)])
        assert code == 2 and len(lines) == 1, (script.__name__, lines)
        # a message names only flags the script has: --resume in the training scripts alone
        resumable = any("--resume" in a.option_strings for a in script.get_args_parser()._actions)
        offer = "--resume continues it, --overwrite starts it again" if resumable else "--overwrite starts it again"
        assert f"already holds a run: {offer}" in lines[0], lines
        assert ("--resume" in lines[0]) == resumable, lines
        assert _files(earlier) == files, script.__name__  # every file byte-identical


def _bad_inputs(tiny_crowds: Path, tiny_mcnn: Path, tmp: Path) -> list:
    """(script, argv, part of the one error line) for each bad input a user can give."""
    text = tmp / "inputs" / "notes.pt"
    text.write_text("not weights\n")
    (tmp / "inputs" / "afile.txt").write_text("x")
    (tmp / "inputs" / "somedir").mkdir()
    broken = tmp / "inputs" / "broken"
    shutil.copytree(tiny_crowds, broken)
    image = sorted((broken / "train_data" / "images").iterdir())[0]
    image.write_bytes(b"not a jpeg")
    test_image = str(sorted((tiny_crowds / "test_data" / "images").iterdir())[0])
    data, test = ["--data", str(tiny_crowds)], str(tiny_crowds / "test_data")
    return [
        (train, ["--model", "vgg", *data], "argument --model: invalid choice: 'vgg'"),
        (patch_attack, ["--model", "foo"], "argument --model: invalid choice: 'foo'"),
        (train, [*data, "--device", "cuda:0"] if not pick_device("auto").type == "cuda" else
         [*data, "--device", "nodevice"], "device"),
        (train, [*data, "--out", str(tmp / "inputs" / "nothing"), "--resume"], "nothing to resume"),
        (train, ["--data", str(broken), "--crop", "32", "--epochs", "1", "--device", "cpu"], "cannot read image"),
        (patch_attack, ["--data", str(broken), "--weights", str(tiny_mcnn)], "cannot read image"),
        (evaluate, ["--weights", str(text), "--data", test], "is not a weight file"),
        (evaluate, ["--data", test], "--weights is required with --data"),
        (evaluate, ["--weights", str(tiny_mcnn), "--data", test, "--out", str(tmp / "inputs" / "afile.txt")],
         "is a file, not a folder"),
        (certify, ["--data", test], "--weights is required"),
        (get_ablated_img, [test_image, "--fill", "7", "--out", "x.png"], "--fill"),
        (get_ablated_img, [test_image, "--out", str(tmp / "inputs" / "somedir") + "/"], "is a folder"),
        (get_ablated_img, [test_image, "--out", "x.jpg"], "must end in .png"),
        (get_ablated_img, [str(tmp / "inputs" / "afile.txt"), "--out", "x.png"], "cannot read image"),
    ]


def test_bad_input_is_one_line_exit_2_and_leaves_no_folder(tiny_crowds, tiny_mcnn, tmp_path, cli_error):
    (tmp_path / "inputs").mkdir()
    cases = _bad_inputs(tiny_crowds, tiny_mcnn, tmp_path)
    before = _tree(tmp_path)
    for script, argv, message in cases:
        code, lines = cli_error(script, argv)
        assert code == 2 and len(lines) == 1 and message in lines[0], (script.__name__, argv, lines)
        assert _tree(tmp_path) == before, (script.__name__, argv, _tree(tmp_path) - before)


def test_out_is_checked_before_any_long_work(tmp_path, monkeypatch, cli_error):
    """With no data, the scripts would render the synthetic crowds and train a victim (minutes): a bad --out is
    refused first."""
    (tmp_path / "afile").write_text("x")

    def long_work(*args, **kwargs):
        raise AssertionError("long work started before --out was checked")

    monkeypatch.setattr(cli, "synthetic_splits", long_work)
    for script in (evaluate, patch_attack, MCNN_adv_train, compare_defenses):
        monkeypatch.setattr(script, "synthetic_victim", long_work)
    before = _tree(tmp_path)
    for script in (train, MCNN_certify_train, MCNN_adv_train, evaluate, patch_attack, compare_defenses):
        code, lines = cli_error(script, ["--out", str(tmp_path / "afile"), "--device", "cpu"])
        assert code == 2 and lines == [f"{script.__name__}.py: error: --out {tmp_path / 'afile'} is a file, not a "
                                       "folder"], (script.__name__, lines)
    assert _tree(tmp_path) == before


def test_make_dataset_checks_every_ground_truth_before_writing(tiny_crowds, tmp_path, cli_error):
    import make_dataset

    copy = tmp_path / "copy"
    shutil.copytree(tiny_crowds, copy)
    last = sorted((copy / "test_data" / "ground_truth").glob("*.mat"))[-1]
    last.unlink()
    before = _tree(tmp_path)
    code, lines = cli_error(make_dataset, ["densities", str(copy)])
    assert code == 2 and len(lines) == 1 and "no ground truth for" in lines[0], lines
    assert _tree(tmp_path) == before  # not one density written for the images before it


def test_certify_checks_out_before_calibrating(tiny_crowds, tiny_mcnn, tmp_path, monkeypatch, cli_error):
    """The calibration takes 22 minutes on Part A's train split: a bad --out fails in under a second, first."""
    import utils.rf_certify

    def calibrate(*args, **kwargs):
        raise AssertionError("the calibration ran before --out was checked")

    monkeypatch.setattr(certify, "calibrate", calibrate, raising=False)
    monkeypatch.setattr(utils.rf_certify, "calibrate", calibrate)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    earlier = runs.start(argparse.Namespace(out=tmp_path / "earlier"), "certify")
    before = _tree(tmp_path)
    for out, message in ((tmp_path / "afile", "is a file, not a folder"), (tmp_path / "notes", "holds no run"),
                         (earlier, "already holds a run: --overwrite starts it again")):
        start = time.perf_counter()
        code, lines = cli_error(certify, ["--method", "rf-clip", "--weights", str(tiny_mcnn), "--data",
                                          str(tiny_crowds / "test_data"), "--calibrate",
                                          str(tiny_crowds / "train_data"), "--patch-sizes", "4", "--out", str(out),
                                          "--device", "cpu"])
        assert time.perf_counter() - start < 1
        assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert _tree(tmp_path) == before


def test_every_json_a_script_writes_is_strict(tiny_crowds, tiny_mcnn, tmp_path, strict_json):
    """Numbers that do not exist are null: the smoothed MAE of a run still in its clean warm-up, the tight-MAE of a
    side where nothing is certified."""
    argv = _script_argv(tiny_crowds, tiny_mcnn)
    warmup = [a if a != "0" else "1" for a in argv[MCNN_certify_train]]  # --epochs 1 --warmup-epochs 1
    for script, args in ((train, argv[train]), (MCNN_certify_train, warmup), (evaluate, argv[evaluate]),
                         (certify, argv[certify])):
        script.main(script.get_args_parser().parse_args([*args, "--out", str(tmp_path / script.__name__)]))
    found = strict_json(tmp_path)
    assert {p.relative_to(tmp_path).parts[0] for p in found} == {"train", "MCNN_certify_train", "evaluate", "certify"}
    ra = found[tmp_path / "MCNN_certify_train" / "metrics.json"]
    assert ra["mae"] is None and ra["mae_over_baseline"] is None and ra["clean_mae"] >= 0
    side = found[tmp_path / "certify" / "metrics.json"]["patch_sizes"]["4"]
    assert side["certified_fraction"] == 0 and side["tight_mae"] is None


def _terminate_when(argv: list[str], ready, limit: float = 120) -> subprocess.CompletedProcess:
    """Run a script, send it SIGTERM (what `timeout` and schedulers send) once `ready()`; its exit status and
    stderr."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + limit
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"{argv[0]} ended before the signal: {proc.stderr.read()}"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, proc.returncode, None, err)


def test_a_loop_cut_short_leaves_its_message_on_a_line_of_its_own(capsys):
    from utils.runtime import progress

    class CutAfterTheFirstDraw:  # Ctrl-C (or SIGTERM) right after the bar's first draw, before the loop starts
        def __init__(self):
            self.writes = 0

        def write(self, text):
            sys.stderr.write(text)
            self.writes += 1
            if self.writes == 1:
                raise KeyboardInterrupt

        def flush(self):
            sys.stderr.flush()

    def main(args):
        for _ in progress(range(3), "epoch 1", file=CutAfterTheFirstDraw()):
            pass

    with pytest.raises(SystemExit) as stopped:
        cli.run(main, cli.ArgumentParser(prog="demo.py"), [])
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert "epoch 1" in err and err.splitlines()[-1] == "demo.py: interrupted; nothing was written", err


@pytest.mark.parametrize("script", ["patch_attack", "certify"])
def test_sigterm_leaves_no_folder(tiny_crowds, tiny_mcnn, tmp_path, script):
    out = tmp_path / "runs" / script
    argv = {"patch_attack": ["--data", str(tiny_crowds), "--weights", str(tiny_mcnn), "--epochs", "100000",
                             "--patch-size", "16", "--figures", "0"],
            "certify": ["--weights", str(tiny_mcnn), "--data", str(tiny_crowds / "test_data"), "--samples",
                        "10000000", "--patch-sizes", "4"]}[script]
    done = _terminate_when([f"{script}.py", *argv, "--device", "cpu", "--out", str(out)],
                           lambda: (out / "args.json").is_file())
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"{script}.py: terminated (SIGTERM); nothing was written"
    assert not (tmp_path / "runs").exists()  # the run folder and the parent made for it


def test_args_json_holds_the_resolved_patch_side_and_device(tiny_crowds, tiny_mcnn, tmp_path, strict_json):
    out = tmp_path / "attack"
    patch_attack.main(patch_attack.get_args_parser().parse_args([
        "--data", str(tiny_crowds), "--weights", str(tiny_mcnn), "--epochs", "1", "--max-test-images", "1",
        "--figures", "0", "--out", str(out)]))
    record = json.loads((out / "args.json").read_text())
    assert record["patch_size"] == 44 and record["patch_frac"] is None  # the default side, as used
    assert record["device"] == str(pick_device("auto")) and record["dtype"] in ("float32", "float16 autocast")
    assert record["amp_dtype"] == "float16" and record["compile"] is False
    assert record["train_data"] == str(tiny_crowds / "train_data")
    assert record["test_data"] == str(tiny_crowds / "test_data")
    assert json.loads((out / "metrics.json").read_text())["patch"]["size"] == 44
    assert set(strict_json(out)) == {out / "args.json", out / "metrics.json"}

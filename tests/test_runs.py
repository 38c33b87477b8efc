"""Run folders (utils/runs.py) and the scripts that use them: no run lands on another, bad input leaves nothing
behind, args.json says what the run did."""
import argparse
import json
import os
import shutil
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
from utils import runs
from utils.errors import ToolkitError
from utils.runtime import pick_device


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
        runs.start(argparse.Namespace(out=out, seed=1), "train")
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


def test_an_unstarted_run_is_discarded_with_the_folders_made_for_it(tmp_path):
    runs.start(argparse.Namespace(out=tmp_path / "new" / "deep" / "run"), "train")
    assert runs.discard_unstarted()
    assert not (tmp_path / "new").exists()
    runs.start(argparse.Namespace(out=tmp_path / "done"), "train")
    (tmp_path / "done" / "last.pt").write_bytes(b"work")
    assert not runs.discard_unstarted()  # it did work: kept
    assert (tmp_path / "done" / "last.pt").is_file()


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
        assert "already holds a run: --resume continues it, --overwrite starts it again" in lines[0], lines
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


def test_args_json_holds_the_resolved_patch_side_and_device(tiny_crowds, tiny_mcnn, tmp_path):
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

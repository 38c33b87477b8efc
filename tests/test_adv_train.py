"""MCNN_adv_train.py: a short run moves the patch and the model, resume carries the patch, bad input."""
import csv
from pathlib import Path

import pytest
import torch

import MCNN_adv_train as script
from utils.io import load_checkpoint
from utils.patch import PatchSpec, random_patch
from utils.recipes import AdversarialRecipe


def _argv(data: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--weights", str(weights), "--out", str(out), "--crop", "64", "--batch-size", "2",
            "--patch-size", "16", "--attack-steps", "2", "--val-attack-epochs", "1", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def adv_run(tiny_crowds, tiny_mcnn, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("adv")
    summary = script.main(script.get_args_parser().parse_args(_argv(tiny_crowds, tiny_mcnn, out, "--epochs", "2")))
    return out, summary


def test_short_run_moves_the_patch_and_the_model(adv_run, tiny_mcnn):
    out, summary = adv_run
    state = load_checkpoint(out / "last.pt")
    start = random_patch(16, torch.Generator().manual_seed(0))
    assert not torch.allclose(state["recipe"]["patch"], start)  # the patch co-evolved
    assert 0 <= float(state["recipe"]["patch"].min()) and float(state["recipe"]["patch"].max()) <= 1
    assert PatchSpec.from_dict(state["patch"]) == PatchSpec(16)  # the checkpoint says which patch it trained against
    before = load_checkpoint(tiny_mcnn)["state_dict"]
    assert any(not torch.equal(state["state_dict"][k], before[k]) for k in before)  # and the model learned
    log = list(csv.DictReader(open(out / "log.csv")))
    assert [float(r["kappa"]) for r in log] == [1.0, 0.5]  # the paper's schedule stretched onto 2 epochs
    assert {"mae", "attacked_mae", "clean_mae", "start"} <= set(summary) and summary["start"]["clean_mae"] >= 0
    assert summary["best_epoch"] == 2  # best.pt comes from an epoch that trained on patches


def test_resume_carries_the_patch(adv_run, tiny_crowds, tiny_mcnn, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(adv_run[0], out)
    saved = load_checkpoint(out / "last.pt")["recipe"]["patch"]
    restored = {}
    load = AdversarialRecipe.load_state_dict

    def spy(self, state):
        load(self, state)
        restored["patch"] = self.attack.patch.clone()

    monkeypatch.setattr(AdversarialRecipe, "load_state_dict", spy)
    script.main(script.get_args_parser().parse_args(_argv(tiny_crowds, tiny_mcnn, out, "--epochs", "3", "--resume")))
    assert torch.equal(restored["patch"], saved)
    assert [int(r["epoch"]) for r in csv.DictReader(open(out / "log.csv"))] == [1, 2, 3]


def test_bad_input_gives_one_line(tiny_crowds, tiny_mcnn, tmp_path, cli_error):
    cases = [(["--attack-steps", "-1"], "attack steps must be at least 0"),
             (["--kappa", "1.5"], "kappa must lie in [0, 1]"),
             (["--kappa", "often"], "kappa must lie in [0, 1]"),
             (["--patch-size", "80"], "patch side 80 is larger than the training crops (64 px)")]
    for extra, message in cases:
        code, lines = cli_error(script, _argv(tiny_crowds, tiny_mcnn, tmp_path / "x", "--epochs", "1", *extra))
        assert code != 0 and len(lines) == 1 and message in lines[0], (extra, lines)

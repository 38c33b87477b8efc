"""utils.distributed, and the scripts under `torchrun --nproc_per_node=2` on the CPU (gloo): replicas bit-identical,
per-image results equal to one process, rank 0 the only writer, and a killed run resumed on another number of ranks."""
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models import build
from utils import distributed
from utils.io import load_checkpoint
from utils.patch import load_patch

REPO = Path(__file__).resolve().parents[1]


def _torchrun(ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]


def test_shards_cover_every_item_once_and_padded_shards_are_equal(monkeypatch):
    items = list(range(7))
    shards, padded = [], []
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shards.append(distributed.shard(items))
        padded.append(distributed.shard(items, pad=True))
    assert sorted(i for s in shards for i in s) == items
    assert [len(p) for p in padded] == [3, 3, 3] and {i for p in padded for i in p} == set(items)


def test_without_torchrun_nothing_is_sharded_gathered_or_averaged():
    assert not distributed.launched() and not distributed.active()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.shard([3, 1, 2], pad=True) == [3, 1, 2]
    assert distributed.gather([{"index": 1}]) == [{"index": 1}]
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_mean(x.clone()), x)
    assert distributed.check_replicas("weights", [x]) == []
    assert distributed.on_main(lambda: 7) == 7


def test_digest_tells_tensors_apart_at_the_bit_level():
    zeros = [torch.zeros(3), torch.tensor(5)]  # a 0-dim integer buffer, as batch norm's counter
    assert distributed.digest(zeros) == distributed.digest([t.clone() for t in zeros])
    assert distributed.digest(zeros) != distributed.digest([-torch.zeros(3), torch.tensor(5)])  # -0.0 vs 0.0
    assert distributed.digest(zeros) != distributed.digest([torch.zeros(3), torch.tensor(6)])


def _replica_digests(stdout: str, what: str) -> list[str]:
    found = re.search(rf"{what}: bit-identical on the 2 ranks \(sha256 per rank: (\w+) (\w+)\)", stdout)
    assert found, f"no replica check of the {what} in:\n{stdout[-2000:]}"
    return list(found.groups())


def _one_run(folder: Path) -> Path:
    runs = list(folder.iterdir())
    assert len(runs) == 1, runs  # another rank would have claimed a second timestamped folder
    return runs[0]


def test_scripts_under_torchrun_agree_with_one_process_and_only_rank_0_writes(tiny_crowds, tiny_mcnn, tiny_ra_mcnn,
                                                                               tmp_path):
    test, train = tiny_crowds / "test_data", tiny_crowds / "train_data"
    common = "--device cpu --figures 1"
    sharded = {  # per-image results that must not depend on how the images are split across ranks
        "evaluate": f"evaluate.py --weights {tiny_mcnn} --data {test} {common}",
        "rf-mask": f"certify.py --method rf-mask --weights {tiny_mcnn} --data {test} --calibrate {train} "
                   f"--patch-sizes 8 16 {common}",
        "ablation": f"certify.py --weights {tiny_ra_mcnn / 'best.pt'} --data {test} --samples 30 --patch-sizes 4 "
                    "--device cpu",
    }
    lines = [f"train.py --data {tiny_crowds} --crop 32 --batch-size 2 --epochs 2 --device cpu",
             f"patch_attack.py --weights {tiny_mcnn} --data {tiny_crowds} --patch-size 16 --epochs 2 --batch-size 1 "
             f"{common}",
             # the co-evolving patch is checked with the weights: a run whose ranks disagree fails
             f"MCNN_adv_train.py --weights {tiny_mcnn} --data {tiny_crowds} --crop 64 --batch-size 2 --epochs 1 "
             "--patch-size 16 --attack-steps 1 --kappa 0.5 --device cpu",
             *(f"{line} --out {tmp_path / 'ranks2' / name}" for name, line in sharded.items())]
    proc = subprocess.run([*_torchrun(2), str(REPO / "tests" / "torchrun_scripts.py"), *lines], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    wrote = dict(re.findall(r"rank (\d) wrote (\d+) files", proc.stderr))
    assert wrote["1"] == "0" and int(wrote["0"]) > 20, wrote
    trained = _one_run(tmp_path / "runs" / "train")
    weights = _replica_digests(proc.stdout, "model weights")
    assert weights[0] == weights[1] == distributed.digest(build("mcnn", trained / "last.pt").state_dict().values())
    patches = _replica_digests(proc.stdout, "patches")
    assert patches[0] == patches[1] == distributed.digest([load_patch(_one_run(tmp_path / "runs" / "patch_attack")
                                                                      / "patch.pt")[0]])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's ranks: the same float summation order
    try:
        for name, line in sharded.items():
            script, *argv = line.split()
            module = __import__(script.removesuffix(".py"))
            module.main(module.get_args_parser().parse_args([*argv, "--out", str(tmp_path / "ranks1" / name)]))
    finally:
        torch.set_num_threads(threads)
    for name in sharded:
        one, two = tmp_path / "ranks1" / name, tmp_path / "ranks2" / name
        assert (two / "per_image.csv").read_text() == (one / "per_image.csv").read_text(), name
        assert len(list(csv.DictReader(open(two / "per_image.csv")))) == 3
    assert (tmp_path / "ranks2" / "rf-mask" / "calibration.json").read_text() == \
        (tmp_path / "ranks1" / "rf-mask" / "calibration.json").read_text()


def test_under_torchrun_every_rank_validates_and_saves_one_weight_average(tiny_crowds, tmp_path):
    out = tmp_path / "ema"
    line = (f"train.py --model smallfield --width 4 --data {tiny_crowds} --crop 32 --batch-size 2 --epochs 2 "
            f"--ema 0.9 --device cpu --out {out}")  # batch norm: each rank's statistics enter its average
    proc = subprocess.run([*_torchrun(2), str(REPO / "tests" / "torchrun_scripts.py"), line], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_checkpoint(out / "last.pt")  # the average as the model, the weights trained beside it
    digests = _replica_digests(proc.stdout, "model weights")
    assert digests[0] == digests[1] == distributed.digest([*saved["training_weights"].values(),
                                                           *saved["state_dict"].values()])


def _log(out: Path) -> list[dict]:
    path = out / "log.csv"
    return list(csv.DictReader(open(path))) if path.is_file() else []


def _kill_every_process_of(out: Path) -> None:
    """SIGKILL every process whose command line names `out`."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(out).encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):  # gone meanwhile
            pass


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_killed_run_resumes_on_another_number_of_ranks(first, then, tiny_crowds, tmp_path):
    out, epochs = tmp_path / "run", 12

    def command(ranks: int, *argv: str) -> list[str]:
        return [*(_torchrun(ranks) if ranks > 1 else [sys.executable]), str(REPO / "train.py"), *argv]

    proc = subprocess.Popen(command(first, "--data", str(tiny_crowds), "--out", str(out), "--crop", "32",
                                    "--batch-size", "2", "--epochs", str(epochs), "--device", "cpu"),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while len(_log(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    _kill_every_process_of(out)  # the launcher and every rank (torchrun starts its ranks in sessions of their own)
    proc.wait()
    before = _log(out)
    assert 2 <= len(before) < epochs, "the run should have been killed mid-way"
    killed_at = load_checkpoint(out / "last.pt")["epoch"]

    resumed = subprocess.run(command(then, "--out", str(out), "--resume"), cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'last.pt'} at epoch {killed_at + 2}" in resumed.stdout
    after = _log(out)
    assert [int(r["epoch"]) for r in after] == list(range(1, epochs + 1))
    kept = min(len(before), killed_at + 1)
    assert after[:kept] == before[:kept]
    assert load_checkpoint(out / "last.pt")["epoch"] == epochs - 1

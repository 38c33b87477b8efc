import json

import pytest
import torch

from utils.errors import ToolkitError
from utils.io import atomic_write, load_checkpoint, save_checkpoint, save_csv, save_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = save_json(tmp_path / "metrics.json", {"mae": 1.0})

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"mae": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_checkpoint_round_trip_and_refusals(tmp_path):
    state = {"model": "mcnn", "state_dict": {"w": torch.arange(3.0)}, "epoch": 2}
    save_checkpoint(tmp_path / "last.pt", state)
    back = load_checkpoint(tmp_path / "last.pt")
    assert back["epoch"] == 2 and torch.equal(back["state_dict"]["w"], torch.arange(3.0))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ToolkitError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(ToolkitError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_unsafe_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ToolkitError):
        load_checkpoint(tmp_path / "evil.pt")


def test_csv_rows(tmp_path):
    path = save_csv(tmp_path / "log.csv", [{"epoch": 1, "mae": 2.5}, {"epoch": 2, "mae": 1.5}])
    assert path.read_text().splitlines() == ["epoch,mae", "1,2.5", "2,1.5"]

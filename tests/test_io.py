import json

import pytest
import torch

from utils.errors import ToolkitError
from utils.io import atomic_write, load_checkpoint, plain, save_checkpoint, save_csv, save_json


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
    with pytest.raises(ToolkitError, match="holds pickled Python objects") as err:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


def _refuse(constant: str):
    raise ValueError(f"{constant} is not JSON")


def strict(text: str):
    """JSON as a strict parser reads it: NaN, Infinity and -Infinity are errors."""
    return json.loads(text, parse_constant=_refuse)


def test_json_is_strict_with_null_for_numbers_that_do_not_exist(tmp_path):
    import numpy as np

    metrics = {"mae": 1.5, "tight_mae": float("nan"), "best_mae": float("inf"), "low": -float("inf"),
               "sides": {"40": {"tight_mse": np.float64("nan"), "width": np.float32(2.5), "n": np.int64(3)}},
               "losses": [0.5, float("nan")], "pair": (float("inf"), 1), "path": tmp_path}
    back = strict(save_json(tmp_path / "metrics.json", metrics).read_text())
    assert back == {"mae": 1.5, "tight_mae": None, "best_mae": None, "low": None,
                    "sides": {"40": {"tight_mse": None, "width": 2.5, "n": 3}}, "losses": [0.5, None],
                    "pair": [None, 1], "path": str(tmp_path)}
    assert plain({"lr": float("nan"), "x": [float("inf"), 2.0]}) == {"lr": None, "x": [None, 2.0]}
    with pytest.raises(ValueError, match="NaN is not JSON"):  # what the writer now never writes
        strict(json.dumps({"mae": float("nan")}))


def test_csv_rows(tmp_path):
    path = save_csv(tmp_path / "log.csv", [{"epoch": 1, "mae": 2.5}, {"epoch": 2, "mae": 1.5}])
    assert path.read_text().splitlines() == ["epoch,mae", "1,2.5", "2,1.5"]

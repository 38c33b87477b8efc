"""count.py: certified intervals equal certify.py's, videos frame by frame, bad input; the released weights."""
import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import certify
import count
from datasets.shanghaitech import list_images
from models import releases


@pytest.fixture(scope="module")
def tiny_sf(tmp_path_factory) -> Path:
    """An untrained SmallField (seed 0): its field is measured in a second, MCNN's in ten; it counts, if badly."""
    from models import build
    from models.weights import checkpoint_state
    from utils.io import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("sf") / "sf.pt", checkpoint_state(build("smallfield", seed=0)))


@pytest.fixture(scope="module")
def certified_run(tiny_sf, tiny_crowds, tmp_path_factory) -> Path:
    """certify.py --method rf-mask on the tiny test split, calibrated on its train split."""
    out = tmp_path_factory.mktemp("certified") / "run"
    certify.main(certify.get_args_parser().parse_args([
        "--model", "smallfield", "--weights", str(tiny_sf), "--data", str(tiny_crowds / "test_data"), "--method",
        "rf-mask", "--calibrate",
        str(tiny_crowds / "train_data"), "--patch-sizes", "8", "16", "--figures", "0", "--device", "cpu",
        "--out", str(out)]))
    return out


def _count(argv: list[str]) -> dict:
    return count.main(count.get_args_parser().parse_args([*argv, "--device", "cpu"]))


def test_intervals_equal_certify_py_for_the_same_images(tiny_sf, tiny_crowds, certified_run, tmp_path, capsys):
    _count([str(tiny_crowds / "test_data" / "images"), "--model", "smallfield", "--weights", str(tiny_sf),
                     "--calibration", str(certified_run / "calibration.json"), "--patch-sizes", "8", "16",
                     "--out", str(tmp_path / "c"), "--figures"])
    expected = list(csv.DictReader(open(certified_run / "per_image.csv")))
    rows = list(csv.DictReader(open(tmp_path / "c" / "counts.csv")))
    assert [Path(r["source"]).name for r in rows] == [r["image"] for r in expected]
    assert all(float(r["count"]) > 0 and float(r["U16"]) > float(r["L16"]) for r in rows)  # not a vacuous match
    for got, want in zip(rows, expected, strict=True):
        for key in ("count8", "L8", "U8", "count16", "L16", "U16"):
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-6, abs=1e-6), key
        assert float(got["count"]) == pytest.approx(float(want["total"]), rel=1e-6)  # the model's own count
    printed = capsys.readouterr().out
    assert all(f"[{float(r['L16']):.1f}, {float(r['U16']):.1f}]" in printed for r in rows)
    assert json.loads((tmp_path / "c" / "counts.json").read_text())["rows"][0]["frame"] is None
    assert len(list((tmp_path / "c" / "figures").iterdir())) == len(rows)


def _video(path: Path, frames: list[np.ndarray]) -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (w, h))
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def test_a_video_gives_one_row_per_counted_frame(tiny_sf, tiny_crowds, certified_run, tmp_path):
    images = list_images(tiny_crowds / "test_data")
    frames = [cv2.imread(str(images[i % len(images)])) for i in range(5)]
    video = _video(tmp_path / "crowd.avi", frames)
    argv = [str(video), "--model", "smallfield", "--weights", str(tiny_sf), "--calibration",
            str(certified_run / "calibration.json"), "--patch-sizes", "8", "16"]
    every = _count([*argv, "--out", str(tmp_path / "all"), "--figures"])
    assert [r["frame"] for r in every["rows"]] == [0, 1, 2, 3, 4]
    assert (tmp_path / "all" / "figures" / "crowd.png").is_file()
    sparse = _count([*argv, "--every", "2"])
    assert [r["frame"] for r in sparse["rows"]] == [0, 2, 4]
    for row in sparse["rows"]:  # the frames counted are those of the full run, certified alike
        same = every["rows"][row["frame"]]
        assert row["L16"] == pytest.approx(same["L16"]) and row["U16"] == pytest.approx(same["U16"])
        assert row["L16"] <= row["count16"] <= row["U16"]
    assert not (Path.cwd() / "runs").exists()  # no --out, no --figures: nothing written


def test_bad_input_is_one_line_and_leaves_nothing(tiny_sf, tiny_crowds, certified_run, tmp_path, cli_error):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    (tmp_path / "blank.avi").write_bytes(b"")
    # --out: the folder no failure may leave behind
    model = ["--model", "smallfield", "--weights", str(tiny_sf), "--calibration",
             str(certified_run / "calibration.json"), "--patch-sizes", "8", "--out", str(tmp_path / "out")]
    image = str(list_images(tiny_crowds / "test_data")[0])
    cases = [([str(tmp_path / "notes.txt")], "is not an image"),
             ([str(tmp_path / "empty")], "holds no images or videos"),
             ([str(tmp_path / "missing.jpg")], "no such file or folder"),
             ([str(tmp_path / "*.png")], "no file matches"),
             ([str(tmp_path / "broken.jpg")], "cannot read image"),
             ([str(tmp_path / "broken.mp4")], "cannot open video"),
             ([str(tmp_path / "blank.avi")], "cannot open video"),
             ([image, "--model", "smallfield", "--weights", str(tiny_sf)], "--calibration is needed"),
             ([image, "--patch-sizes", "99"], "holds no rf-mask constant")]
    for argv, message in cases:
        code, lines = cli_error(count, argv if "--weights" in argv else [*model, *argv])  # argv's flags last: they win
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, lines)
        assert not (tmp_path / "out").exists()


@pytest.fixture
def release(tiny_mcnn, tiny_sf, certified_run, tmp_path, monkeypatch) -> releases.Release:
    """The tiny SmallField and its calibration published as release `tiny-sf` into a temporary weights/ folder
    (the size check against a full training checkpoint: the tiny MCNN's)."""
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setattr(releases, "WEIGHTS_DIR", folder)
    monkeypatch.setattr(releases, "MANIFEST", folder / "releases.json")
    published = releases.publish("tiny-sf", tiny_sf, certified_run / "calibration.json")
    assert published == releases.releases()["tiny-sf"] and published.model == "smallfield"
    assert sorted(torch.load(published.weights, weights_only=True)) == ["model", "model_kwargs", "state_dict"]
    mcnn = releases.publish("tiny-mcnn", tiny_mcnn, certified_run / "calibration.json")  # from a run's last.pt
    assert mcnn.weights.stat().st_size < tiny_mcnn.stat().st_size / 2  # weights only: no optimiser state
    return published


def test_a_release_name_sets_the_model_and_its_calibration(release, tiny_crowds, certified_run, tmp_path, cli_error):
    image = str(list_images(tiny_crowds / "test_data")[0])
    named = _count([image, "--weights", "tiny-sf", "--patch-sizes", "8", "16"])  # --model omitted: the release's
    assert named["model"] == "smallfield" and named["calibration"] == str(release.calibration)
    by_path = _count([image, "--model", "smallfield", "--weights", str(release.weights), "--calibration",
                      str(certified_run / "calibration.json"), "--patch-sizes", "8", "16"])
    assert named["rows"][0]["L16"] == by_path["rows"][0]["L16"]
    code, lines = cli_error(count, [image, "--weights", "tiny-sf", "--model", "csrnet"])
    assert code == 2 and lines == [
        "count.py: error: --weights tiny-sf is a smallfield release, not csrnet: leave --model out"]
    # certify.py takes the release's calibration too
    metrics = certify.main(certify.get_args_parser().parse_args([
        "--weights", "tiny-sf", "--data", str(tiny_crowds / "test_data"), "--method", "rf-mask", "--patch-sizes",
        "16", "--figures", "0", "--device", "cpu", "--out", str(tmp_path / "cert")]))
    assert metrics["patch_sizes"]["16"]["certified_fraction"] == 1.0


def test_a_release_file_with_a_wrong_digest_is_refused(release, tiny_crowds, cli_error):
    image = str(list_images(tiny_crowds / "test_data")[0])
    with open(release.weights, "ab") as f:
        f.write(b"\0")
    code, lines = cli_error(count, [image, "--weights", "tiny-sf"])
    assert code == 2 and len(lines) == 1 and "does not match the SHA-256 digest" in lines[0]


def test_a_new_calibration_of_a_release_keeps_its_weights_file(release, tmp_path):
    before = release.weights.stat().st_mtime_ns
    calibration = json.loads(release.calibration.read_text())
    calibration |= {"refill": "fitted", "slope": {side: 1.1 for side in calibration["c"]}}
    (tmp_path / "fitted.json").write_text(json.dumps(calibration))
    again = releases.publish("tiny-sf", release.weights, tmp_path / "fitted.json")  # from the released file itself
    assert again.weights_sha256 == release.weights_sha256 and release.weights.stat().st_mtime_ns == before
    assert again.calibration_sha256 != release.calibration_sha256
    assert json.loads(again.calibration.read_text())["refill"] == "fitted"

"""evaluate.py end to end: the real MCNN weights reproduce the golden counts on ShanghaiTech-mini."""
import csv
import json

import pytest

import evaluate

WEIGHTS = {"mcnn_shtechA_count": "mcnn_shtechA_660.h5", "mcnn_shtechB_count": "mcnn_shtechB_110.h5"}
SPLITS = ["part_A_final/train_data", "part_A_final/test_data", "part_B_final/train_data", "part_B_final/test_data"]


@pytest.mark.parametrize("key", WEIGHTS)
def test_real_mcnn_counts_match_golden(shared_dir, tmp_path, key):
    mini = shared_dir / "data" / "ShanghaiTech-mini"
    golden = {item["path"]: item for item in json.loads((mini / "mcnn_golden.json").read_text())["images"]}
    checked = 0
    for split in SPLITS:
        out = tmp_path / split.replace("/", "_")
        args = evaluate.get_args_parser().parse_args(
            ["--model", "mcnn", "--weights", str(shared_dir / "weights" / WEIGHTS[key]), "--data", str(mini / split),
             "--out", str(out), "--figures", "1", "--device", "cpu"])
        metrics = evaluate.main(args)
        rows = list(csv.DictReader(open(out / "per_image.csv")))
        for row in rows:
            item = golden[f"{split}/images/{row['image']}"]
            # golden counts every annotation; we drop the few that lie outside the image
            assert 0 <= item["gt_count"] - float(row["gt"]) <= 0.01 * item["gt_count"]
            # 2 % is the acceptance; reading the JPEG's own luma makes it agree to about 1e-5
            assert float(row["pred"]) == pytest.approx(item[key], rel=1e-3), row["image"]
            checked += 1
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["mae"] == pytest.approx(metrics["mae"]) and "rmse" in saved and "mse" not in saved
        assert (out / "figures").is_dir()
    assert checked == len(golden) == 19


def test_bad_input_gives_one_line_and_nonzero_exit(shared_dir, tmp_path, cli_error):
    weights = shared_dir / "weights" / "mcnn_shtechA_660.h5"
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    cases = [
        (["--model", "resnet"], "argument --model: invalid choice"),
        (["--model", "cmtl", "--weights", str(weights)], f"{weights} holds MCNN weights, not CMTL's: use --model mcnn"),
        (["--model", "csrnet", "--weights", str(weights)],
         f"evaluate.py: error: {weights} holds MCNN weights, not CSRNet's: use --model mcnn"),
        (["--model", "mcnn", "--weights", str(tmp_path / "nope.h5")], "not found"),
        (["--model", "mcnn", "--weights", str(weights), "--data", str(empty)], "holds no images"),
        (["--model", "mcnn", "--weights", str(weights), "--data", str(tmp_path / "missing")], "not found"),
    ]
    for argv, message in cases:
        code, lines = cli_error(evaluate, [*argv, "--out", str(tmp_path / "out")])
        assert code != 0 and len(lines) == 1 and message in lines[0], (argv, lines)
        assert len(lines[0]) < 200, lines  # one short line, not a list of parameter names


def _mcnn_h5(path, change):
    """An MCNN weights file in the original release's layout (flat HDF5 names), with `change(state)` applied."""
    import h5py

    from models import build

    state = build("mcnn", seed=0).net.state_dict()
    change(state)
    with h5py.File(path, "w") as f:
        for key, value in state.items():
            f.create_dataset(key, data=value.numpy())
    return path


def test_nan_weights_exit_2_with_one_line_naming_the_file(tiny_crowds, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    weights = _mcnn_h5(tmp_path / "diverged.h5",
                       lambda s: s["DME.branch1.0.conv.weight"].view(-1)[7].fill_(float("nan")))
    done = subprocess.run([sys.executable, "evaluate.py", "--weights", str(weights), "--data",
                           str(tiny_crowds / "test_data"), "--out", str(tmp_path / "out"), "--device", "cpu"],
                          cwd=Path(evaluate.__file__).parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"evaluate.py: error: {weights} holds non-finite weights (NaN or Inf) in "
                                        "DME.branch1.0.conv.weight: a corrupt file or a training run that diverged"]
    assert "MAE" not in done.stdout and not (tmp_path / "out").exists()


def test_non_finite_counts_are_an_error_naming_the_weights(tiny_crowds, tmp_path, cli_error):
    """Finite weights whose counts overflow: an error naming the file, and no run folder (no metrics.json of NaN)."""
    weights = _mcnn_h5(tmp_path / "huge.h5", lambda s: s["DME.fuse.0.conv.bias"].fill_(3e38))
    code, lines = cli_error(evaluate, ["--weights", str(weights), "--data", str(tiny_crowds / "test_data"), "--out",
                                       str(tmp_path / "out"), "--device", "cpu", "--figures", "0"])
    lines = [line for line in lines if line.strip() and not line.startswith("eval:")]  # progress bar redraws
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"evaluate.py: error: the model loaded from {weights} counts NaN or Inf on 3 of 3 "
                               "images (first: IMG_1.jpg)"), lines
    assert not (tmp_path / "out").exists()


def test_pickled_weights_are_one_line_that_never_advises_unsafe_loading(tiny_crowds, tmp_path, cli_error):
    import torch

    from models import build

    # a whole module saved with torch.save, as many releases are
    torch.save({"net": torch.nn.Identity(), "state_dict": build("mcnn").net.state_dict()}, tmp_path / "model.pth")
    code, lines = cli_error(evaluate, ["--weights", str(tmp_path / "model.pth"), "--data",
                                       str(tiny_crowds / "test_data"), "--out", str(tmp_path / "out")])
    assert code == 2 and len(lines) == 1, lines
    assert f"{tmp_path / 'model.pth'} holds pickled Python objects (torch.nn.modules.linear.Identity)" in lines[0]
    assert lines[0].endswith("save a plain state dict")
    assert "weights_only" not in lines[0] and not (tmp_path / "out").exists()


def _shrunk_h5_copy(split, tmp_path):
    """A copy of `split` with adaptive h5 densities holding 98 % of the heads' mass (as CSRNet's own generator, which
    loses the mass of heads near the border)."""
    import shutil

    import h5py

    from make_dataset import write_densities

    copy = tmp_path / "h5_data" / split.name
    shutil.copytree(split, copy)
    write_densities(copy, "adaptive")
    for path in (copy / "ground_truth").glob("*.h5"):
        with h5py.File(path, "r+") as f:
            f["density"][...] = f["density"][...] * 0.98
    return copy


def test_game0_equals_mae_and_ground_truth_is_the_points_for_every_density(shared_dir, tmp_path):
    """The real MCNN on two Part A test images: the ground truth is the number of annotated heads inside each image
    whatever --density is (an h5 map that sums to less included), and GAME(0) is MAE with every density."""
    from datasets.shanghaitech import ground_truth_file, image_size, list_images, read_points

    split = shared_dir / "data" / "ShanghaiTech-mini" / "part_A_final" / "test_data"
    heads = {image.name: len(read_points(ground_truth_file(image, ".mat"), *image_size(image)))
             for image in list_images(split)[:2]}
    runs = {}
    for density in ("adaptive", "fixed", "h5"):
        data = _shrunk_h5_copy(split, tmp_path) if density == "h5" else split
        out = tmp_path / density
        metrics = evaluate.main(evaluate.get_args_parser().parse_args(
            ["--model", "mcnn", "--weights", str(shared_dir / "weights" / "mcnn_shtechA_660.h5"), "--data", str(data),
             "--density", density, "--max-images", "2", "--figures", "0", "--out", str(out), "--device", "cpu"]))
        rows = list(csv.DictReader(open(out / "per_image.csv")))
        assert {r["image"]: float(r["gt"]) for r in rows} == heads, density
        for row in rows:
            assert float(row["game0"]) == pytest.approx(abs(float(row["pred"]) - float(row["gt"])), abs=1e-3)
        assert metrics["game0"] == pytest.approx(metrics["mae"], abs=1e-3), density
        assert json.loads((out / "metrics.json").read_text())["game0"] == pytest.approx(metrics["mae"], abs=1e-3)
        runs[density] = metrics
    assert runs["h5"]["mae"] == runs["adaptive"]["mae"] == runs["fixed"]["mae"]  # same counts, same ground truth

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
        assert saved["mae"] == pytest.approx(metrics["mae"]) and "mse" in saved
        assert (out / "figures").is_dir()
    assert checked == len(golden) == 19


def test_bad_input_gives_one_line_and_nonzero_exit(shared_dir, tmp_path, cli_error):
    weights = shared_dir / "weights" / "mcnn_shtechA_660.h5"
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    cases = [
        (["--model", "resnet"], "argument --model: invalid choice"),
        (["--model", "cmtl", "--weights", str(weights)], "does not fit cmtl"),
        (["--model", "mcnn", "--weights", str(tmp_path / "nope.h5")], "not found"),
        (["--model", "mcnn", "--weights", str(weights), "--data", str(empty)], "holds no images"),
        (["--model", "mcnn", "--weights", str(weights), "--data", str(tmp_path / "missing")], "not found"),
    ]
    for argv, message in cases:
        code, lines = cli_error(evaluate, [*argv, "--out", str(tmp_path / "out")])
        assert code != 0 and len(lines) == 1 and message in lines[0], (argv, lines)

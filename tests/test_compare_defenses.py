"""compare_defenses.py: the table, the RA certificate with the ablation the model was trained with, the
receptive-field rows checked against their certificates, a run resumed or repeated from its args.json, bad rows and
mixed architectures."""
import json

import numpy as np
import pytest

import compare_defenses
from utils import runs
from utils.patch import PatchTransform, footprint_side


def test_table_of_three_given_models(tiny_crowds, tiny_mcnn, tiny_ra_mcnn, tmp_path, capsys):
    args = compare_defenses.get_args_parser().parse_args([
        "--data", str(tiny_crowds), "--vanilla", str(tiny_mcnn), "--adv", str(tiny_mcnn), "--ra",
        str(tiny_ra_mcnn / "best.pt"), "--patch-sizes", "8", "16", "--attack-epochs", "1", "--restarts", "1",
        "--samples", "40", "--attack-samples", "5", "--eot", "2", "--out", str(tmp_path), "--device", "cpu"])
    results = compare_defenses.main(args)
    table = (tmp_path / "comparison.md").read_text()
    assert table in capsys.readouterr().out and (tmp_path / "comparison.png").is_file()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 5  # header, three models, the floor
    assert "APAM maximize 8 px" in table and "APAM minimize 16 px" in table
    # the same checkpoint as "vanilla" and "adv", attacked with the same seed and budget: the same numbers
    assert results["undefended"]["attacked"] == results["adversarial training"]["attacked"]
    # the probe patches are fitted on the train split and measured on the test split, as patch_attack.py does
    ra = results["randomized ablation (k=45)"]
    assert ra["attack_split"] == "train" and "crops of the train split" in table
    cert = ra["certificate"]
    assert cert["keep"] == 45 and set(cert["patch_sizes"]) == {"8", "16"}
    # each probe side is certified for the pixels its transformed, bilinearly sampled patch can change
    for side, c in cert["patch_sizes"].items():
        assert c["certified_side"] == max(int(side), footprint_side(int(side), "circle", PatchTransform()))
    assert cert["patch_sizes"]["8"]["certified_side"] > 8
    assert "nan" not in table.lower()  # a side where nothing is certified shows its 0 %, no tight-MAE
    assert ra["clean"] == cert["counter"]
    # its attacked counts checked against its own interval, per image certified
    for side, per_target in ra["checked"].items():
        certified = [x for x in ra["per_image"] if not np.isnan(x[f"L{side}"])]
        for target, check in per_target.items():
            outside = [x["image"] for x, count in zip(ra["per_image"], ra["attacked"][side][target]["counts"],
                                                      strict=True)
                       if not np.isnan(x[f"L{side}"]) and not x[f"L{side}"] <= count <= x[f"U{side}"]]
            assert check == {"counts": len(certified), "outside": outside}
    # each attacked MAE is that of the attacked counts recorded per image
    for r in results.values():
        for per_target in r["attacked"].values():
            for m in per_target.values():
                assert m["mae"] == pytest.approx(np.mean(np.abs(np.array(m["counts"]) - [
                    x["gt"] for x in r["per_image"]])))


def test_receptive_field_rows_keep_every_attacked_count_inside_their_certificate(tiny_crowds, tiny_mcnn, tmp_path,
                                                                                 capsys):
    out = tmp_path / "rows"
    argv = ["--data", str(tiny_crowds), "--row", "plain MCNN", "plain", str(tiny_mcnn), "--row", "MCNN rf-mask",
            "rf-mask", str(tiny_mcnn), "--row", "MCNN rf-clip", "rf-clip", str(tiny_mcnn), "--patch-sizes", "16",
            "--certify-sizes", "8", "16", "--attack-epochs", "2", "--restarts", "1", "--attack-images", "2",
            "--out", str(out), "--device", "cpu"]
    results = compare_defenses.main(compare_defenses.get_args_parser().parse_args(argv))
    assert list(results) == ["plain MCNN", "MCNN rf-mask", "MCNN rf-clip"]  # --row given: no trained rows
    assert len(list((out / "calibration").iterdir())) == 1  # one calibration for both counters of one file
    for label in ("MCNN rf-mask", "MCNN rf-clip"):
        r = results[label]
        assert r["test_images"] == 3 and len(r["attack_images"]) == 2 and r["scored_images"] == 3
        bounds = {x["image"]: (x["L16"], x["U16"]) for x in r["per_image"]}
        for target, m in r["attacked"]["16"].items():
            # independently of the script's own check: each attacked count inside its image's interval
            for name, count in zip(r["attack_images"], m["counts"], strict=True):
                assert bounds[name][0] <= count <= bounds[name][1], (label, target, name)
            assert r["checked"]["16"][target] == {"counts": 2, "outside": []}
    table = (out / "comparison.md").read_text()
    assert "0 of 4" in table and "deterministic certificates: 0 of 8" in capsys.readouterr().out
    # resumed from its args.json: every row reused, the same table
    compare_defenses.main(compare_defenses.get_args_parser().parse_args(["--out", str(out), "--resume"]))
    assert capsys.readouterr().out.count("reusing") == 3 and (out / "comparison.md").read_text() == table
    # resumed with one more row: the three reused, the new one added to the table and to args.json
    compare_defenses.main(compare_defenses.get_args_parser().parse_args([
        "--out", str(out), "--resume", "--row", "MCNN again", "plain", str(tiny_mcnn)]))
    assert capsys.readouterr().out.count("reusing") == 3
    again = (out / "comparison.md").read_text().splitlines()
    assert again[:5] == table.splitlines()[:5] and again[5].startswith("| MCNN again | 1 |")
    # the new row is the same model as the first: the same figures, computed again
    assert again[5].split("|")[4:] == table.splitlines()[2].split("|")[4:]
    assert len(json.loads((out / "args.json").read_text())["row"]) == 4


@pytest.mark.parametrize("row, message", [
    (["x", "smoothed", "W"], "unknown method 'smoothed'"),
    (["x", "plain"], "takes LABEL METHOD WEIGHTS [CALIBRATION]"),
    (["x", "plain", "missing.pt"], "weights not found: missing.pt"),
    (["x", "plain", "W", "cal.json"], "a calibration is for rf-clip and rf-mask"),
])
def test_a_bad_row_is_one_line(tiny_crowds, tiny_mcnn, tmp_path, cli_error, row, message):
    row = [str(tiny_mcnn) if v == "W" else v for v in row]
    code, lines = cli_error(compare_defenses, ["--data", str(tiny_crowds), "--row", *row, "--out",
                                               str(tmp_path / "x")])
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "x").exists()


def test_mixed_architectures_give_one_line(tiny_crowds, tiny_mcnn, tmp_path, cli_error):
    from models import build
    from models.weights import checkpoint_state
    from utils.io import save_checkpoint

    other = save_checkpoint(tmp_path / "cmtl.pt", checkpoint_state(build("cmtl")))
    code, lines = cli_error(compare_defenses, ["--data", str(tiny_crowds), "--vanilla", str(tiny_mcnn), "--adv",
                                               str(other), "--out", str(tmp_path / "x")])
    assert code != 0 and len(lines) == 1 and "holds a cmtl model, not mcnn" in lines[0], lines


def test_the_ra_model_is_attacked_and_certified_with_its_trained_ablation(tiny_crowds, tiny_mcnn, tiny_ra_pixel,
                                                                          tmp_path, ablation_log):
    compare_defenses.main(compare_defenses.get_args_parser().parse_args([
        "--data", str(tiny_crowds), "--vanilla", str(tiny_mcnn), "--adv", str(tiny_mcnn), "--ra",
        str(tiny_ra_pixel / "last.pt"), "--patch-sizes", "8", "--attack-epochs", "1", "--restarts", "1",
        "--samples", "4", "--attack-samples", "2", "--eot", "1", "--max-test-images", "1", "--max-train-images", "2",
        "--out", str(tmp_path), "--device", "cpu"]))  # no ablation flags
    ablation_log.check(unit="pixel", fill=0.5, crops=True)


def test_a_run_repeated_from_its_args_json_gives_the_same_table(tiny_crowds, tiny_mcnn, tmp_path):
    parser = compare_defenses.get_args_parser()
    first = tmp_path / "first"
    compare_defenses.main(parser.parse_args([
        "--data", str(tiny_crowds), "--vanilla", str(tiny_mcnn), "--adv", str(tiny_mcnn), "--ra-epochs", "2",
        "--ra-warmup-epochs", "1", "--keep", "300", "--patch-sizes", "8", "--attack-epochs", "1", "--restarts", "1",
        "--samples", "10", "--attack-samples", "2", "--eot", "1", "--max-test-images", "2", "--out", str(first),
        "--device", "cpu"]))
    record = json.loads((first / "args.json").read_text())
    assert record["ra"] is None and record["ra_epochs"] == 2  # trained here: an output, recorded in metrics.json
    assert record["adv_epochs"] == 6 and record["adv_val_restarts"] == 2  # resolved, though unused here
    compare_defenses.main(runs.recorded_args(parser, record, out=tmp_path / "again"))

    def untimed(table: str) -> list[list[str]]:  # every cell but the seconds per image
        return [line.split("|")[:3] + line.split("|")[4:] for line in table.splitlines()]

    assert untimed((tmp_path / "again" / "comparison.md").read_text()) == untimed((first / "comparison.md").read_text())


def test_rows_that_would_share_a_file_are_one_line(tiny_crowds, tiny_mcnn, tmp_path, cli_error):
    code, lines = cli_error(compare_defenses, ["--data", str(tiny_crowds), "--adv", str(tiny_mcnn), "--row",
                                               "Adversarial training", "plain", str(tiny_mcnn), "--out",
                                               str(tmp_path / "x")])
    assert code == 2 and len(lines) == 1 and "would share rows/adversarial-training.json" in lines[0], lines
    assert not (tmp_path / "x").exists()


def test_rows_added_on_resume_need_a_run_with_rows(tiny_crowds, tiny_mcnn, tmp_path, cli_error):
    run = tmp_path / "paper"  # a comparison of the paper's three models, recorded without --row
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"script": "compare_defenses", "row": None, "data": str(tiny_crowds)}))
    code, lines = cli_error(compare_defenses, ["--out", str(run), "--resume", "--row", "X", "plain", str(tiny_mcnn)])
    assert code == 2 and len(lines) == 1 and "--row adds to what the run being resumed recorded" in lines[0], lines

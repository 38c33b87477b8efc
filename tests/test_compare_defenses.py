"""compare_defenses.py: the table, the RA certificate with the ablation the model was trained with, a run repeated
from its args.json, and mixed architectures."""
import json

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
    assert sum(line.startswith("| ") for line in table.splitlines()) == 4  # header and three models
    # the same checkpoint as "vanilla" and "adv", attacked with the same seed and budget: the same numbers
    assert results["vanilla"]["attacked"] == results["adv"]["attacked"]
    # the probe patches are fitted on the train split and measured on the test split, as patch_attack.py does
    assert results["ra"]["attack_split"] == "train" and "crops of the train split" in table
    cert = results["ra"]["certificate"]
    assert cert["keep"] == 45 and set(cert["patch_sizes"]) == {"8", "16"}
    # each probe side is certified for the pixels its transformed, bilinearly sampled patch can change
    for side, c in cert["patch_sizes"].items():
        footprint = footprint_side(int(side), "circle", PatchTransform())
        assert c["certified_side"] == max(int(side), footprint)
        assert f"{side}px (as {c['certified_side']}px)" in table
    assert cert["patch_sizes"]["8"]["certified_side"] > 8
    assert "nan" not in table.lower()  # a side where nothing is certified shows its 0 %, no tight-MAE
    assert results["ra"]["clean"] == cert["counter"]


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
    assert (tmp_path / "again" / "comparison.md").read_text() == (first / "comparison.md").read_text()

"""tradeoff.py: reads certify runs (a counter per side for rf-mask, one counter otherwise), plots, bad input."""
import json
import math

import pytest
from PIL import Image

import tradeoff


def _run(folder, method: str, sides: dict, counter=None):
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"script": "certify", "model": "mcnn"}))
    (folder / "metrics.json").write_text(json.dumps({"method": method, "counter": counter, "patch_sizes": sides}))
    return folder


def test_points_per_side_and_the_figure(tmp_path):
    mask = _run(tmp_path / "mask", "rf-mask", {"20": {"mae": 30.0, "tight_mae": 40.0, "floor": 4.4},
                                               "40": {"mae": 31.0, "tight_mae": 45.0, "floor": 8.5}})
    clip = _run(tmp_path / "clip", "rf-clip", {"20": {"tight_mae": 90.0}, "40": {"tight_mae": float("nan")},
                                               "81": {"tight_mae": None}},  # null: how save_json writes NaN
                counter={"mae": 19.0})
    assert tradeoff.run_points(mask, None) == ("mask (mcnn, rf-mask)", {20: (30.0, 40.0, 1.0), 40: (31.0, 45.0, 1.0)})
    assert tradeoff.run_points(mask, [40]) == ("mask (mcnn, rf-mask)", {40: (31.0, 45.0, 1.0)})
    points = tradeoff.run_points(clip, None)[1]  # nothing certified at 40, 81: kept, marked by a NaN tight-MAE
    assert points[20] == (19.0, 90.0, 1.0) and all(math.isnan(points[s][1]) and points[s][2] == 0 for s in (40, 81))
    out = tradeoff.main(tradeoff.get_args_parser().parse_args([str(mask), str(clip), "--out",
                                                              str(tmp_path / "t.png")]))
    assert Image.open(out).size[0] > 300
    assert tradeoff.run_floors(mask, None) == {20: 4.4, 40: 8.5} and tradeoff.run_floors(clip, None) == {}
    other = _run(tmp_path / "other", "rf-mask", {"20": {"mae": 30.0, "tight_mae": 40.0, "floor": 6.7}})
    with pytest.raises(Exception, match="another floor at 20 px"):
        tradeoff.main(tradeoff.get_args_parser().parse_args([str(mask), str(other), "--out", str(tmp_path / "u.png")]))


def test_bad_input(tmp_path, cli_error):
    mask = _run(tmp_path / "mask", "rf-mask", {"20": {"mae": 30.0, "tight_mae": 40.0}})
    (tmp_path / "exists.png").write_bytes(b"x")
    cases = [([str(tmp_path / "nowhere"), "--out", "t.png"], "holds no args.json"),
             ([str(mask), str(mask), "--out", "t.png"], "two runs are labelled"),
             ([str(mask), "--labels", "a", "b", "--out", "t.png"], "--labels gives 2 labels for 1 runs"),
             ([str(mask), "--sides", "81", "--out", "t.png"], "has no side among [81]"),
             ([str(mask), "--out", str(tmp_path / "exists.png")], "already exists; add --overwrite"),
             ([str(mask), "--out", "t.jpg"], "must end in .png or .pdf or .svg")]
    for argv, message in cases:
        code, lines = cli_error(tradeoff, argv)
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, lines)
    assert (tmp_path / "exists.png").read_bytes() == b"x"
    with pytest.raises(SystemExit):
        tradeoff.get_args_parser().parse_args([])


def test_the_figure_marks_partial_and_missing_certificates_without_overlapping_labels():
    from utils.plots import _tradeoff_fig

    points = {"a": {20: (10.0, 20.0, 1.0), 40: (11.0, 30.0, 0.5), 81: (12.0, math.nan, 0.0)},
              "b": {20: (10.2, 20.5, 1.0), 40: (11.1, 30.2, 1.0)}}
    fig = _tradeoff_fig(points, floors={20: 4.0, 40: 8.0})
    ax = fig.axes[0]
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["50% certified", "81 px: none certified"]  # the side is in the marker, not a label per point
    labels = ax.get_legend_handles_labels()[1] or [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"a", "b", "20 px patch", "40 px patch", "81 px patch", "some images not certified",
            "none certified (drawn at the top)"} <= set(labels)
    assert ax.get_ylim()[1] > 30.2  # the top row of uncertified markers sits above every point


def test_every_model_has_its_own_colour_beyond_ten():
    from matplotlib.colors import to_hex

    from utils.plots import _tradeoff_fig

    points = {f"model {k}": {40: (10.0 + k, 20.0 + k, 1.0)} for k in range(12)}
    legend = _tradeoff_fig(points).axes[0].get_legend()
    colours = {text.get_text(): to_hex(handle.get_color())
               for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True)
               if text.get_text().startswith("model")}
    assert len(colours) == 12 and len(set(colours.values())) == 12

"""Figures a reader can trust: shared colour scales, counts with the truth, honest axes, vector formats."""
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from utils.errors import ToolkitError
from utils.plots import (
    DENSITY_LABEL,
    _bar_fig,
    _curve_fig,
    _density_fig,
    _interval_fig,
    bar_figure,
    curve_figure,
    density_figure,
    image_panels,
    interval_figure,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _maps():
    clean = torch.full((1, 16, 20), 0.05)
    attacked = torch.zeros(1, 16, 20)
    attacked[0, 4:8, 4:8] = 2.5  # the patch's peak: far above every clean value
    return torch.rand(3, 64, 80), [("clean", clean), ("attacked", attacked)]


def _panels(fig):
    """(image axes, density axes, colourbar axes) of a density figure."""
    images = [ax for ax in fig.axes if ax.images]
    colorbars = [ax for ax in fig.axes if not ax.images]
    return images[0], images[1:], colorbars


def test_density_panels_share_one_scale_from_zero_with_one_labelled_colorbar():
    image, panels = _maps()
    fig = _density_fig(image, panels, "IMG_7.jpg", truth=130)
    _, dens, colorbars = _panels(fig)
    limits = {ax.images[0].get_clim() for ax in dens}
    assert limits == {(0.0, 2.5)}  # vmin 0, vmax the largest value of any panel: the clean map is not rescaled
    assert len(colorbars) == 1 and colorbars[0].get_ylabel() == DENSITY_LABEL


def test_density_titles_carry_each_count_and_the_truth():
    image, panels = _maps()
    fig = _density_fig(image, panels, "IMG_7.jpg", truth=130)
    first, dens, _ = _panels(fig)
    assert "IMG_7.jpg" in first.get_title() and "130" in first.get_title()
    assert [ax.get_title() for ax in dens] == ["clean: 16.0 (truth 130)", "attacked: 40.0 (truth 130)"]
    fractional = _density_fig(image, panels, truth=129.5)
    assert "(truth 129.5)" in _panels(fractional)[1][0].get_title()


def test_density_figure_of_an_all_zero_map_still_draws(tmp_path):
    image, _ = _maps()
    path = density_figure(tmp_path / "zero.png", image, [("prediction", torch.zeros(1, 16, 20))], truth=0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("suffix", "magic"), [("png", (b"\x89PNG",)), ("pdf", (b"%PDF",)),
                                               ("svg", (b"<?xml", b"<svg"))])
def test_the_suffix_picks_the_format(tmp_path, suffix, magic):
    image, panels = _maps()
    written = [density_figure(tmp_path / f"d.{suffix}", image, panels, truth=3),
               curve_figure(tmp_path / f"c.{suffix}", {"loss": [3.0, 2.0, 1.0]}, title="loss"),
               bar_figure(tmp_path / f"b.{suffix}", {"vanilla": {"clean": 1.0, "20px": 5.0}}, ylabel="MAE"),
               interval_figure(tmp_path / f"i.{suffix}", [{"gt": 3, "count": 3.5, "L20": 1, "U20": 6}], [20]),
               image_panels(tmp_path / f"p.{suffix}", [("image", torch.rand(3, 8, 8)), ("map", torch.rand(8, 8))])]
    for path in written:
        assert path.suffix == f".{suffix}" and path.read_bytes().lstrip().startswith(magic), path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temporary files left


def test_an_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(ToolkitError, match=r"\.png, \.pdf, \.svg"):
        curve_figure(tmp_path / "c.jpg", {"loss": [1.0, 2.0]})
    assert not list(tmp_path.iterdir())
    assert not plt.get_fignums()  # the figure was closed all the same


def test_a_small_change_of_a_positive_curve_keeps_its_size():
    fig = _curve_fig({"APAM loss": [100.0, 99.5, 98.4]}, ylabel="loss", title="APAM loss per epoch")
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 100  # a 1.6 % drop looks like one
    assert ax.get_title().splitlines() == ["APAM loss per epoch", "APAM loss: 100 → 98.4 (-1.6%)"]
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "loss"
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_a_curve_of_one_epoch_has_integer_ticks():
    fig = _curve_fig({"loss": [0.5]}, ylabel="loss")
    fig.canvas.draw()
    ax = fig.axes[0]
    shown = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert shown == [1.0]


def test_a_negative_curve_is_not_pinned_to_zero_but_shows_its_change():
    fig = _curve_fig({"APAM loss": [-120.0, -121.0, -122.0]}, ylabel="loss", title="APAM loss per epoch")
    ax = fig.axes[0]
    assert ax.get_ylim()[1] < 0  # fitted to the data
    assert "-120 → -122 (-1.7%)" in ax.get_title()
    assert sorted(t.get_text() for t in ax.texts) == ["-120", "-122"]  # the end values written on the curve


def test_curves_with_nan_and_a_single_epoch(tmp_path):
    fig = _curve_fig({"test MAE": [float("nan"), 4.0, 3.0], "mean-count baseline": [5.0] * 3}, ylabel="MAE",
                     title="test MAE")
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_legend() is not None
    assert ax.get_title().splitlines() == ["test MAE", "test MAE: 4 → 3 (-25.0%)"]  # the constant baseline: no note
    single = _curve_fig({"train loss": [0.5]}, title="training loss").axes[0]
    assert single.get_ylim()[0] == 0 and single.get_title() == "training loss"


def test_bars_start_at_zero_and_carry_their_values():
    fig = _bar_fig({"vanilla": {"clean": 10.0, "20px": 40.0}, "ra": {"clean": 12.0, "20px": 13.0}},
                   ylabel="MAE", title="MAE per defence", xlabel="model")
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 40
    assert sorted(t.get_text() for t in ax.texts) == ["10.0", "12.0", "13.0", "40.0"]
    assert ax.get_title() == "MAE per defence" and ax.get_xlabel() == "model" and ax.get_ylabel() == "MAE"


def test_interval_figure_names_the_images_in_order_and_marks_what_is_not_certified():
    rows = [{"image": f"IMG_{g:.0f}.jpg", "gt": g, "count20": g + 1.0, "count40": g + 2.0, "L20": g - 2.0,
             "U20": g + 3.0, "L40": g - 4.0, "U40": g + 6.0} for g in (5.0, 20.0, 12.0)]
    rows[1].update(L40=float("nan"), U40=float("nan"))
    fig = _interval_fig(rows, [20, 40])
    ax = fig.axes[0]
    assert "certified" in ax.get_title() and "40 px: 1 of 3" in ax.get_title() and ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["IMG_5.jpg", "IMG_20.jpg", "IMG_12.jpg"]  # rows' order
    assert ax.get_ylim()[0] == 0
    labels = ax.get_legend_handles_labels()[1]
    assert "its counter's count, 20 px" in labels and "its counter's count, 40 px" in labels  # a marker per side
    assert "side not certified" in labels and "true count" in labels
    legend = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
    assert legend.x0 >= ax.get_window_extent(fig.canvas.get_renderer()).x1  # outside the bars
    truth = next(line for line in ax.get_lines() if line.get_label() == "true count")
    assert np.allclose(truth.get_ydata(), [5, 20, 12])


def test_interval_figure_of_a_whole_split_plots_bounds_against_the_truth():
    rows = [{"image": f"IMG_{i}.jpg", "gt": float(i), "count": i + 0.5, "L40": i - 3.0, "U40": i + 4.0}
            for i in range(1, 183)]
    fig = _interval_fig(rows, [40])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "true count (people)" and fig.get_size_inches()[0] < 8  # readable, not a strip
    upper = next(line for line in ax.get_lines() if line.get_label() == "U")
    assert np.allclose(upper.get_xdata(), [r["gt"] for r in rows]) and np.allclose(upper.get_ydata(),
                                                                                    [r["U40"] for r in rows])



"""get_ablated_img.py: the ablated image and panel, bad input."""
import numpy as np
from PIL import Image

import get_ablated_img


def test_writes_the_ablated_image_and_a_panel(tiny_crowds, tmp_path):
    image = next((tiny_crowds / "test_data" / "images").iterdir())
    out = get_ablated_img.main(get_ablated_img.get_args_parser().parse_args(
        [str(image), "--keep", "500", "--unit", "pixel", "--fill", "0", "--out", str(tmp_path / "a.png")]))
    pixels = np.asarray(Image.open(out))
    assert pixels.shape == (96, 128, 3)
    assert (pixels.reshape(-1, 3).any(1)).sum() <= 500  # at most 500 pixels are not the black fill
    assert (pixels.reshape(-1, 3).any(1)).sum() >= 450  # (a few kept pixels may be black themselves)
    panel = get_ablated_img.main(get_ablated_img.get_args_parser().parse_args(
        [str(image), "--keep", "500", "--panel", "--out", str(tmp_path / "p.png")]))
    assert Image.open(panel).size[0] > 3 * 96


def test_the_kept_view_shows_exactly_the_kept_pixels_grown_to_be_seen():
    import math

    import torch

    from utils.ablation import AblationSpec

    spec, shape = AblationSpec(30, "pixel", 0.25), (3, 40, 60)
    image = torch.rand(shape)
    ablated = spec.ablate(image[None], torch.Generator().manual_seed(7))[0]
    kept = (ablated != spec.fill).any(0)  # a random pixel equal to the fill in all 3 channels has probability 0
    view = get_ablated_img.kept_units_view(spec, torch.Size(shape), 7, ablated, grow=1)
    assert torch.equal(~view.isnan(), kept) and int(kept.sum()) == 30
    assert torch.allclose(view[kept], image.mean(0)[kept])  # the brightness of each kept pixel
    grown = get_ablated_img.kept_units_view(spec, torch.Size(shape), 7, ablated, grow=3)
    assert (~grown.isnan()).sum() > 30 and not grown[kept].isnan().any()
    assert get_ablated_img.visible_dot(1024) % 2 == 1 and get_ablated_img.visible_dot(1024) >= math.ceil(
        4 * 1024 / get_ablated_img.FIGURE_PIXELS)


def test_bad_input(tmp_path, cli_error):
    code, lines = cli_error(get_ablated_img, [str(tmp_path / "none.jpg"), "--out", str(tmp_path / "x.png")])
    assert code == 2 and len(lines) == 1 and "not found" in lines[0]
    code, lines = cli_error(get_ablated_img, [str(tmp_path / "none.jpg"), "--keep", "0", "--out",
                                              str(tmp_path / "x.png")])
    assert code == 2 and "must be a positive integer" in lines[-1]

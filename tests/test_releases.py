"""The released weights (weights/releases.json): their digests, and the figures recorded at release reproduced from
the files: per image on ShanghaiTech-mini (fast), on the full test split (slow)."""
import json

import pytest

import certify
import count
from datasets.shanghaitech import list_images
from models import releases

RELEASES = releases.releases()
MANIFEST = json.loads(releases.MANIFEST.read_text()) if releases.MANIFEST.is_file() else {}


def test_every_release_file_matches_its_digest():
    for found in RELEASES.values():
        releases.verified(found.weights, found.weights_sha256, found.name)
        releases.calibration(found)
        assert found.weights.stat().st_size < 20 * 2**20, "a release is weights only: a few MB"


@pytest.mark.parametrize("name", [n for n in RELEASES if "mini" in MANIFEST[n]])
def test_a_release_counts_the_mini_images_as_recorded(name, shared_dir):
    recorded = MANIFEST[name]["mini"]
    images = list_images(shared_dir / "data" / recorded["data"])
    result = count.main(count.get_args_parser().parse_args(
        [*map(str, images), "--weights", name, "--patch-sizes", *map(str, recorded["patch_sizes"]),
         "--device", "cpu"]))
    rows = {r["source"].rsplit("/", 1)[-1]: r for r in result["rows"]}
    assert sorted(rows) == sorted(recorded["rows"])
    for image, want in recorded["rows"].items():
        for key, value in want.items():
            assert rows[image][key] == pytest.approx(value, rel=1e-5, abs=1e-4), (image, key)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in RELEASES if "test" in MANIFEST[n]])
def test_a_release_reproduces_its_full_test_figures(name, shared_dir, tmp_path):
    recorded = MANIFEST[name]["test"]
    metrics = certify.main(certify.get_args_parser().parse_args([
        "--weights", name, "--method", "rf-mask", "--data", str(shared_dir / "data" / recorded["data"]),
        "--patch-sizes", *recorded["patch_sizes"], "--figures", "0", "--device", "cpu", "--out", str(tmp_path)]))
    for side, want in recorded["patch_sizes"].items():
        got = metrics["patch_sizes"][side]
        for key in ("mae", "tight_mae", "floor"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (side, key)

"""The synthetic crowd generator: ShanghaiTech layout and .mat format, determinism, heads at the points,
perspective, cache reuse and atomic writes."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
from scipy.stats import spearmanr

from datasets import synthetic
from datasets.synthetic import VERSION, ensure_synthetic, render_scene, write_synthetic
from utils.errors import ToolkitError

SMALL = {"n_train": 4, "n_test": 2, "height": 96, "width": 128, "max_count": 40}


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Location and number, indexed the way ShanghaiTech readers do."""
    info = scipy.io.loadmat(path)["image_info"][0, 0][0, 0]
    return info[0], info[1]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_mat_format(tmp_path):
    root = write_synthetic(tmp_path / "set", seed=1, **SMALL)
    assert root == tmp_path / "set"
    total = 0
    for split, n in (("train_data", 4), ("test_data", 2)):
        names = sorted(p.name for p in (root / split / "images").iterdir())
        assert names == [f"IMG_{i}.jpg" for i in range(1, n + 1)]
        assert len(list((root / split / "ground_truth").iterdir())) == n
        for i in range(1, n + 1):
            img = cv2.imread(str(root / split / "images" / f"IMG_{i}.jpg"), cv2.IMREAD_UNCHANGED)
            assert img.shape == (96, 128, 3) and img.dtype == np.uint8
            location, number = read_mat(root / split / "ground_truth" / f"GT_IMG_{i}.mat")
            assert location.dtype == np.float64 and location.ndim == 2 and location.shape[1] == 2
            assert number.shape == (1, 1) and int(number[0, 0]) == len(location)
            assert np.all((location >= 0) & (location < [128, 96]))
            total += len(location)
    assert total > 0


def test_empty_scenes(tmp_path):
    img, points = render_scene(np.random.default_rng(0), 64, 80, 0)
    assert img.shape == (64, 80, 3) and points.shape == (0, 2)
    root = write_synthetic(tmp_path / "empty", n_train=2, n_test=1, height=64, width=64, max_count=0)
    for mat in root.rglob("GT_IMG_*.mat"):
        location, number = read_mat(mat)
        assert location.reshape(-1, 2).shape == (0, 2) and number[0, 0] == 0


def test_counts_cover_the_range():
    counts = synthetic._draw_counts(np.random.default_rng(0), 400, 300)
    assert counts.min() == 0 and counts.max() <= 300
    assert 8 <= (counts == 0).sum() <= 30  # a few empty scenes, not many
    assert (counts > 250).sum() >= 20 and ((counts > 0) & (counts < 10)).sum() >= 20  # dense and sparse


def test_deterministic_by_seed(tmp_path):
    a = files(write_synthetic(tmp_path / "a", seed=3, **SMALL))
    b = files(write_synthetic(tmp_path / "b", seed=3, **SMALL))
    c = files(write_synthetic(tmp_path / "c", seed=4, **SMALL))
    assert a == b  # same bytes, .mat headers included
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert len(jpgs) == 6 and all(a[k] != c[k] for k in jpgs)


def one_person(seed: int, height: int = 96, width: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """|scene with one person - the same scene empty| (same rng: same background and camera) and the point."""
    empty, _ = render_scene(np.random.default_rng(seed), height, width, 0)
    img, points = render_scene(np.random.default_rng(seed), height, width, 1)
    return np.abs(img.astype(int) - empty.astype(int)).max(-1), points[0]


def test_person_is_drawn_at_its_point():
    r_max = 10 * 1.15 * 240 / 240
    at_head = []
    for seed in range(10):
        diff, (x, y) = one_person(seed, 240, 320)
        rows, cols = np.nonzero(diff)
        # everything that changed is the figure around the point: head above, shoulders and torso below
        assert np.all(np.abs(cols + 0.5 - x) < 3 * r_max) and np.all(rows + 0.5 > y - 2 * r_max)
        assert np.all(rows + 0.5 < y + 10 * r_max)
        assert y - 2 * r_max < rows.min() + 0.5 < y  # the head is the top of the figure
        at_head.append(diff[int(y), int(x)])
    assert np.median(at_head) > 30  # the head itself is visible where the point is


def test_perspective_people_grow_toward_the_bottom():
    ys, widths = [], []
    for seed in range(40):
        diff, (x, y) = one_person(seed)
        ys.append(y)
        widths.append((diff[int(y)] > 10).sum())  # width of the head on its centre row
    assert spearmanr(ys, widths).statistic > 0.5


def test_ensure_reuses_the_cached_set(tmp_path, monkeypatch):
    monkeypatch.setenv("CROWD_CACHE", str(tmp_path / "cache"))
    params = {"n_train": 2, "n_test": 1, "height": 64, "width": 64, "max_count": 10}
    root = ensure_synthetic(**params)
    assert root == tmp_path / "cache" / "synthetic" / f"v{VERSION}-s0-2x1-64x64-c10"
    assert (root / "test_data" / "ground_truth" / "GT_IMG_1.mat").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def no_write(*args):
        raise AssertionError("the cached set was rewritten")

    monkeypatch.setattr(synthetic, "_write_jpeg", no_write)
    assert ensure_synthetic(**params) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    with pytest.raises(ToolkitError, match="synthetic set made with"):
        ensure_synthetic(root, **{**params, "seed": 1})


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    real, calls = synthetic._write_jpeg, []

    def flaky(path, img):
        calls.append(path)
        if len(calls) > 2:
            raise OSError("disk full")
        real(path, img)

    monkeypatch.setattr(synthetic, "_write_jpeg", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic(tmp_path / "set", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the set nor its temporary folder
    monkeypatch.setattr(synthetic, "_write_jpeg", real)
    assert len(list(ensure_synthetic(tmp_path / "set", **SMALL).rglob("*.jpg"))) == 6


def test_bad_input_is_a_toolkit_error(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("user data")
    with pytest.raises(ToolkitError, match="not overwriting"):
        write_synthetic(tmp_path / "full", **SMALL)
    assert (tmp_path / "full" / "mine.txt").read_text() == "user data"
    with pytest.raises(ToolkitError, match="max_count"):
        write_synthetic(tmp_path / "x", max_count=-1)
    with pytest.raises(ToolkitError, match="height"):
        render_scene(np.random.default_rng(0), 8, 64, 3)

import numpy as np
import pytest
import scipy.io
import torch

from datasets.shanghaitech import ground_truth_file, list_images, load_image, read_points, write_points
from utils.errors import ToolkitError


def test_points_outside_the_image_are_dropped(tmp_path):
    pts = [[5.0, 5.0], [-3.0, 2.0], [10.0, 20.0], [9.99, 19.99], [0.0, 0.0]]
    write_points(tmp_path / "GT.mat", pts)
    kept = read_points(tmp_path / "GT.mat", height=20, width=10)
    np.testing.assert_array_equal(kept, [[5.0, 5.0], [9.99, 19.99], [0.0, 0.0]])
    assert len(read_points(tmp_path / "GT.mat")) == 5


def test_count_comes_from_points_not_the_uint8_number(tmp_path):
    pts = np.random.default_rng(0).random((300, 2)) * 50
    write_points(tmp_path / "GT.mat", pts)
    mat = scipy.io.loadmat(tmp_path / "GT.mat")
    mat["image_info"][0, 0][0, 0][1][0, 0] = 300 % 256  # as a uint8 `number` field would hold it
    scipy.io.savemat(tmp_path / "GT.mat", {"image_info": mat["image_info"]})
    assert len(read_points(tmp_path / "GT.mat", 50, 50)) == 300


def test_mat_without_points_is_a_clear_error(tmp_path):
    scipy.io.savemat(tmp_path / "bad.mat", {"something": np.zeros(3)})
    with pytest.raises(ToolkitError, match="holds no head points"):
        read_points(tmp_path / "bad.mat")
    (tmp_path / "junk.mat").write_bytes(b"\x00junk")
    with pytest.raises(ToolkitError):
        read_points(tmp_path / "junk.mat")


def test_real_grey_image_becomes_three_equal_channels(shared_dir):
    path = shared_dir / "data/ShanghaiTech-mini/part_A_final/train_data/images/IMG_298.jpg"
    image = load_image(path)
    assert image.shape[0] == 3 and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_real_split_listing_and_annotations(shared_dir):
    split = shared_dir / "data/ShanghaiTech-mini/part_A_final/test_data"
    images = list_images(split)
    assert [p.name for p in images] == ["IMG_26.jpg", "IMG_34.jpg", "IMG_53.jpg", "IMG_95.jpg", "IMG_135.jpg",
                                        "IMG_136.jpg"]
    assert ground_truth_file(images[0], ".mat").name == "GT_IMG_26.mat"


def test_bad_folders_and_images(tmp_path):
    with pytest.raises(ToolkitError, match="no images/ folder"):
        list_images(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(ToolkitError, match="holds no images"):
        list_images(tmp_path)
    (tmp_path / "images" / "IMG_1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ToolkitError, match="cannot read image"):
        load_image(tmp_path / "images" / "IMG_1.jpg")
    with pytest.raises(ToolkitError, match="not found"):
        load_image(tmp_path / "images" / "IMG_2.jpg")

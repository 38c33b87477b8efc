"""Fixtures shared by the whole suite."""
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The real fixtures in ../shared (weights, ShanghaiTech-mini); skips when this clone has none."""
    if not (SHARED / "weights").is_dir() or not (SHARED / "data").is_dir():
        pytest.skip(f"real fixtures not found at {SHARED} (only CI and the team's machines have ../shared)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_crowds(tmp_path_factory) -> Path:
    """A small synthetic set in ShanghaiTech layout (6 train, 3 test images of 96×128)."""
    from datasets.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("crowds") / "tiny", n_train=6, n_test=3, height=96, width=128,
                           max_count=40, seed=1)

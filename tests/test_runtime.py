"""utils.runtime: devices, derived seeds and the CUDA fast paths (off on the CPU)."""
import pytest
import torch

from utils import runtime
from utils.errors import ToolkitError


@pytest.fixture
def restore_fast_paths():
    saved = dict(runtime._fast_paths)
    yield
    runtime._fast_paths.update(saved)


def test_fast_paths_are_checked_and_stay_off_on_the_cpu(restore_fast_paths):
    with pytest.raises(ToolkitError, match="bfloat16"):
        runtime.configure("int8")
    runtime.configure("bfloat16", compile=True)
    cpu = torch.device("cpu")
    with runtime.autocast(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    model = runtime.prepare_model(torch.nn.Conv2d(3, 4, 3), cpu)
    assert type(model) is torch.nn.Conv2d and model.weight.is_contiguous()  # neither compiled nor channels-last


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autocast_takes_the_configured_dtype_on_cuda(restore_fast_paths):
    cuda = torch.device("cuda")
    for name in runtime.AMP_DTYPES:
        runtime.configure(name)
        with runtime.autocast(cuda):
            assert (torch.ones(2, 2, device=cuda) @ torch.ones(2, 2, device=cuda)).dtype == getattr(torch, name)


def test_derived_seeds_depend_on_every_key_and_nothing_else():
    assert runtime.derived_seed(0, 1) == runtime.derived_seed(0, 1)
    assert len({runtime.derived_seed(0, 1), runtime.derived_seed(1, 0), runtime.derived_seed(0, 2)}) == 3
    assert 0 <= runtime.derived_seed(2**40, -1) < 2**63

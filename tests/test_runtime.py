"""utils.runtime: devices, derived seeds and the fast paths (on the CPU: bfloat16 autocast only)."""
import pytest
import torch

from utils import runtime
from utils.errors import ToolkitError


def test_fast_paths_are_checked_and_only_bfloat16_autocasts_on_the_cpu():
    with pytest.raises(ToolkitError, match="bfloat16"):
        runtime.configure("int8")
    cpu = torch.device("cpu")
    runtime.configure("float16", compile=True)
    with runtime.autocast(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    runtime.configure("bfloat16", compile=True)
    with runtime.autocast(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with runtime.autocast(cpu, enabled=False):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert runtime.autocasts(cpu, True, "bfloat16") and not runtime.autocasts(cpu, True, "float16")
    model = runtime.prepare_model(torch.nn.Conv2d(3, 4, 3), cpu)
    assert type(model) is torch.nn.Conv2d  # not compiled on the CPU, but channels-last (oneDNN's NHWC kernels)
    assert model.weight.is_contiguous(memory_format=torch.channels_last) and not model.weight.is_contiguous()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autocast_takes_the_configured_dtype_on_cuda():
    cuda = torch.device("cuda")
    for name in runtime.AMP_DTYPES:
        runtime.configure(name)
        with runtime.autocast(cuda):
            assert (torch.ones(2, 2, device=cuda) @ torch.ones(2, 2, device=cuda)).dtype == getattr(torch, name)


def test_derived_seeds_depend_on_every_key_and_nothing_else():
    assert runtime.derived_seed(0, 1) == runtime.derived_seed(0, 1)
    assert len({runtime.derived_seed(0, 1), runtime.derived_seed(1, 0), runtime.derived_seed(0, 2)}) == 3
    assert 0 <= runtime.derived_seed(2**40, -1) < 2**63


def test_batch_for_memory_fills_the_asked_share_of_free_gpu_memory(monkeypatch):
    """On CUDA the batch is fraction × free memory / the peak memory of one item, capped; elsewhere the default.
    The CUDA memory queries are simulated (this machine has no GPU): one item takes 300 MB at its peak."""
    allocated = {"now": 1_000, "peak": 1_000}

    def forward(n: int) -> None:
        allocated["peak"] = allocated["now"] + n * 300_000_000

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (12_000_000_000, 80_000_000_000))
    assert runtime.batch_for_memory(forward, cuda, 0.5, default=64, most=1000) == 20  # 6 GB / 300 MB
    assert runtime.batch_for_memory(forward, cuda, 0.5, default=64, most=8) == 8
    assert runtime.batch_for_memory(forward, cuda, 0.01, default=64, most=1000) == 1  # never below one
    assert runtime.batch_for_memory(forward, torch.device("cpu"), 0.5, default=64, most=1000) == 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_for_memory_gives_a_batch_that_runs_on_cuda():
    cuda = torch.device("cuda")
    model = torch.nn.Conv2d(3, 64, 3, padding=1).to(cuda)
    batch = runtime.batch_for_memory(lambda n: model(torch.rand(n, 3, 512, 512, device=cuda)), cuda, 0.2, 1, 10_000)
    assert batch >= 1
    with torch.no_grad():
        model(torch.rand(batch, 3, 512, 512, device=cuda))

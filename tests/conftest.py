"""Fixtures shared by the whole suite."""
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own temporary folder, so a default runs/<script>/... never lands in the clone."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _restore_fast_paths():
    """A script's main() configures this process's autocast dtype; no test leaves its choice to the next one."""
    from utils import runtime

    saved = dict(runtime._fast_paths)
    yield
    runtime._fast_paths.update(saved)


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


@pytest.fixture(scope="session")
def tiny_mcnn(tiny_crowds, tmp_path_factory) -> Path:
    """Checkpoint of an MCNN trained for a few seconds on `tiny_crowds` (counts roughly, not well).

    Seed 1: with seed 0 the original N(0, 0.01) init gives a final ReLU that dies in the first steps.
    """
    import torch

    from datasets.crowd import CrowdDataset
    from models import build
    from utils.training import fit

    torch.manual_seed(1)
    model = build("mcnn")
    out = tmp_path_factory.mktemp("tiny_mcnn")
    summary = fit(model, CrowdDataset.for_model(tiny_crowds / "train_data", model, crop=64), None,
                  CrowdDataset.for_model(tiny_crowds / "test_data", model), out, epochs=20, batch_size=2, lr=1e-3,
                  device=torch.device("cpu"))
    assert summary["mae"] < summary["baseline_mae"], summary
    return out / "last.pt"


@pytest.fixture(scope="session")
def tiny_ra_mcnn(tiny_crowds, tmp_path_factory) -> Path:
    """Run folder of MCNN_certify_train.py on `tiny_crowds`: 2 clean epochs, then 4 on ablations keeping 45."""
    import MCNN_certify_train as script

    out = tmp_path_factory.mktemp("tiny_ra_mcnn")
    script.main(script.get_args_parser().parse_args([
        "--data", str(tiny_crowds), "--out", str(out), "--crop", "64", "--batch-size", "2", "--epochs", "6",
        "--warmup-epochs", "2", "--keep", "45", "--val-samples", "3", "--device", "cpu", "--seed", "1"]))
    return out


@pytest.fixture(scope="session")
def tiny_counter():
    """Factory of tiny fully convolutional counters by name ("conv-pool", stride 2; "dilated", stride 4;
    "upsampling", a transposed convolution, stride 1): leaky activations and no final ReLU, so every path can show
    a change."""
    import torch
    from torch import nn

    from models.counter import CrowdCounter

    nets = {
        "conv-pool": (2, lambda: [nn.Conv2d(3, 4, 5, padding=2), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
                                  nn.Conv2d(4, 4, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(4, 1, 1)]),
        "dilated": (4, lambda: [nn.Conv2d(3, 4, 3, padding=1), nn.PReLU(), nn.MaxPool2d(2),
                                nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
                                nn.Conv2d(4, 4, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(4, 1, 1)]),
        "upsampling": (1, lambda: [nn.Conv2d(3, 4, 5, padding=2), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
                                   nn.Conv2d(4, 4, 3, padding=1), nn.LeakyReLU(0.1),
                                   nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1), nn.LeakyReLU(0.1),
                                   nn.Conv2d(4, 1, 1)]),
    }

    def make(name: str, seed: int = 0) -> CrowdCounter:
        stride, layers = nets[name]
        torch.manual_seed(seed)
        return CrowdCounter(name, nn.Sequential(*layers()), stride=stride, size_multiple=4, native_channels=3).eval()

    return make


@pytest.fixture(scope="session")
def pool_counter():
    """Factory of counters built to be worst cases for a receptive-field certificate: `pool_counter(kind, side,
    offset, stride, upsample=1)` max-pools (kind "max") or min-pools ("min": one minus the minimum) the grey image
    over exactly side × side pixels, cell j seeing rows and columns j·stride + offset .. + side − 1, optionally
    repeating each cell `upsample` times (nearest). One changed pixel anywhere in a cell's field moves it when it
    becomes the new extreme, so the cells a bright (max) or dark (min) patch moves are all the cells it reaches."""
    from torch import nn

    from models.counter import CrowdCounter

    class Pool(nn.Module):
        def __init__(self, kind: str, side: int, offset: int, stride: int, upsample: int):
            super().__init__()
            pad = -offset
            # separable: the max over a square is the max over its rows of the max over its columns
            self.rows = nn.MaxPool2d((side, 1), (stride, 1), (pad, 0))
            self.cols = nn.MaxPool2d((1, side), (1, stride), (0, pad))
            self.up = nn.Upsample(scale_factor=upsample, mode="nearest") if upsample > 1 else nn.Identity()
            self.kind = kind

        def forward(self, grey):  # grey in 0..255
            x = grey / 255 if self.kind == "max" else 1 - grey / 255
            return self.up(self.cols(self.rows(x)))

    def make(kind: str, side: int, offset: int, stride: int, upsample: int = 1) -> CrowdCounter:
        return CrowdCounter(f"{kind}-pool", Pool(kind, side, offset, stride * upsample, upsample),
                            stride=stride, size_multiple=stride * upsample, native_channels=1).eval()

    return make


@pytest.fixture(scope="session")
def tiny_ra_pixel(tiny_crowds, tmp_path_factory) -> Path:
    """Run folder of MCNN_certify_train.py with a non-default ablation: 300 pixels kept, filled with 0.5."""
    import MCNN_certify_train as script

    out = tmp_path_factory.mktemp("tiny_ra_pixel")
    script.main(script.get_args_parser().parse_args([
        "--data", str(tiny_crowds), "--out", str(out), "--crop", "64", "--batch-size", "2", "--epochs", "2",
        "--warmup-epochs", "1", "--keep", "300", "--unit", "pixel", "--fill", "0.5", "--val-samples", "2",
        "--device", "cpu", "--seed", "1"]))
    return out


class AblationLog(list):
    """(spec, ablated batch, kind) of every ablation a script builds for the model: kind "crop" or "image" from
    `AblationSpec.ablate`, "draws" from `ablate_at` (kept draws applied again, as a smoothed sweep does)."""

    def check(self, unit: str, fill: float, crops: bool = False) -> None:
        """Every batch was ablated by `unit` with `fill` (and some were crops of the kept-unit share, if `crops`)."""
        import torch

        assert self, "nothing was ablated"
        for spec, batch, _ in self:
            assert (spec.unit, spec.fill) == (unit, fill)
            at_fill = batch == fill  # no pixel of a JPEG is exactly 0.5 or 0.25 (k / 255)
            if unit == "pixel":  # a pixel is kept or filled in all its channels at once
                assert torch.equal(at_fill.all(dim=1), at_fill.any(dim=1))
            assert at_fill.float().mean() > 0.5
        assert not crops or any(kind == "crop" for _, _, kind in self)


@pytest.fixture
def ablation_log(monkeypatch) -> AblationLog:
    from utils.ablation import AblationSpec

    log, real, real_at = AblationLog(), AblationSpec.ablate, AblationSpec.ablate_at

    def recording(self, x, generator=None, crop=False):
        out = real(self, x, generator, crop)
        log.append((self, out.detach(), "crop" if crop else "image"))
        return out

    def recording_at(self, x, idx):
        out = real_at(self, x, idx)
        log.append((self, out.detach(), "draws"))
        return out

    monkeypatch.setattr(AblationSpec, "ablate", recording)
    monkeypatch.setattr(AblationSpec, "ablate_at", recording_at)
    return log


@pytest.fixture
def cli_error(capsys):
    """Run a script's `main` in-process through `utils.cli.run`; returns (exit status, stderr lines)."""
    from utils import cli

    def run(script, argv: list[str]) -> tuple[int, list[str]]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.run(script.main, script.get_args_parser(), argv)
        return exit_info.value.code, capsys.readouterr().err.strip().splitlines()

    return run


def _refuse_constant(constant: str):
    raise ValueError(f"{constant} is not JSON")


@pytest.fixture
def strict_json():
    """Parse every .json file under a folder as a strict parser does (NaN, Infinity: errors); returns
    {path: content}, and fails naming the file that is not strict JSON."""
    import json

    def parse(root: Path) -> dict[Path, object]:
        found = {}
        for path in sorted(Path(root).rglob("*.json")):
            try:
                found[path] = json.loads(path.read_text(), parse_constant=_refuse_constant)
            except ValueError as e:
                pytest.fail(f"{path} is not strict JSON: {e}")
        assert found, f"no JSON file under {root}"
        return found

    return parse

"""SmallField: a counter built to be certified. Every output cell sees a 33×33 pixel window (MCNN: 72, CSRNet: 284)
by default, so a patch can reach few cells and the receptive-field certificates stay tight; stride 4, non-negative
output. Each 3×3 residual block at stride 4 beyond the first (`blocks`) widens the field by 16 px.

Only 3×3 convolutions (two at stride 2) and 1×1 mixing, with batch normalisation and residual blocks: in eval mode
batch norm is a per-channel affine map, so it leaves the field where the convolutions put it.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.counter import CrowdCounter
from utils.errors import ToolkitError

# The head predicts 100 × the density: per-cell targets are about 0.01, while Adam moves each parameter by about its
# learning rate per step; at unit scale the first epoch overshot every output cell below zero.
DENSITY_SCALE = 100.0


def conv_norm(cin: int, cout: int, k: int, stride: int = 1, norm: bool = True) -> list[nn.Module]:
    """A convolution and its batch norm, or a convolution with a bias and an identity in the norm's place (so the
    modules keep their indices, and checkpoints their keys)."""
    return [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=not norm),
            nn.BatchNorm2d(cout) if norm else nn.Identity()]


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, norm: bool = True) -> nn.Sequential:
    return nn.Sequential(*conv_norm(cin, cout, k, stride, norm), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """x + two convolutions of x (the second without its ReLU until after the sum)."""

    def __init__(self, width: int, k: int, norm: bool = True):
        super().__init__()
        self.body = nn.Sequential(conv_bn(width, width, k, norm=norm), *conv_norm(width, width, k, norm=norm))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + self.body(x))


class NonNegative(nn.LeakyReLU):
    """ReLU in eval mode, so the density is never negative (the certificates need it); leaky while training, so an
    output pushed below zero everywhere (easily done early on: most target cells are 0) still gets a gradient back
    instead of dying."""

    def __init__(self):
        super().__init__(0.01)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) if self.training else F.relu(x)


class SmallField(nn.Module):
    def __init__(self, width: int = 24, blocks: int = 1, norm: bool = True):
        super().__init__()
        w1, w2, w4 = width, 2 * width, 4 * width
        self.features = nn.Sequential(
            conv_bn(3, w1, norm=norm),                  # field 3
            conv_bn(w1, w2, stride=2, norm=norm),       # 5, stride 2
            Residual(w2, 3, norm),                      # 13
            conv_bn(w2, w4, stride=2, norm=norm),       # 17, stride 4
            *(Residual(w4, 3, norm) for _ in range(blocks)),  # 33, then +16 per block
            Residual(w4, 1, norm), Residual(w4, 1, norm),     # 1×1 mixing: capacity without widening the field
        )
        self.head = nn.Sequential(nn.Conv2d(w4, w2, 1), nn.ReLU(inplace=True), nn.Conv2d(w2, 1, 1), NonNegative())

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)) / DENSITY_SCALE


def deepened(model: CrowdCounter, blocks: int, seed: int | None = None) -> CrowdCounter:
    """`model` with `blocks` 3×3 residual blocks at stride 4 (field 33 + 16 (blocks − 1) px): the blocks added after its
    own each start as the identity (the last layer of their body zeroed, so relu(x + 0) = x for the non-negative x a
    block receives), so the new network counts exactly as `model` until it is trained. The rest of the new blocks'
    weights are drawn as `models.build` draws them with `seed`."""
    if model.name != "smallfield":
        raise ToolkitError(f"{model.name} has no option blocks")
    kwargs = dict(model.model_kwargs)
    have = kwargs.get("blocks", 1)
    if blocks < have:
        raise ToolkitError(f"the weights have {have} 3x3 blocks at stride 4: --blocks may add blocks, not remove them")
    if blocks == have:
        return model
    with torch.random.fork_rng(devices=[]):  # as models.build: the global RNG is not moved
        if seed is not None:
            torch.manual_seed(seed)
        grown = build_smallfield(**{**kwargs, "blocks": blocks})
    first_new = 4 + have  # the index in `features` of the first module after the model's own 3×3 blocks
    state = grown.net.state_dict()
    for key, value in model.net.state_dict().items():
        parts = key.split(".")
        if parts[0] == "features" and int(parts[1]) >= first_new:
            parts[1] = str(int(parts[1]) + blocks - have)
        state[".".join(parts)] = value
    grown.net.load_state_dict(state)
    for block in grown.net.features[first_new:first_new + blocks - have]:
        last = block.body[-1] if isinstance(block.body[-1], nn.BatchNorm2d) else block.body[-2]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return grown


def build_smallfield(width: int = 24, blocks: int = 1, norm: bool = True) -> CrowdCounter:
    """`norm=False`: no batch norm (a bias per convolution instead), so training and evaluation compute the same
    function and no running statistics move the count between epochs."""
    if width < 1 or blocks < 1:
        raise ToolkitError(f"SmallField needs a width and blocks of at least 1, got width {width}, blocks {blocks}")
    kwargs = {"width": width}  # the other options only where not the default, as older checkpoints record them
    if blocks != 1:
        kwargs["blocks"] = blocks
    if not norm:
        kwargs["norm"] = False
    return CrowdCounter("smallfield", SmallField(width, blocks, norm), stride=4, size_multiple=4, native_channels=3,
                        model_kwargs=kwargs)

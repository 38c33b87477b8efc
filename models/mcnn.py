"""MCNN (Zhang et al., CVPR 2016) as in svishwa/crowdcount-mcnn: three columns on grey 0-255, stride 4."""
import torch
from torch import Tensor, nn

from models.counter import CrowdCounter, Nested, normal_init


class Conv(nn.Module):
    """svishwa's `Conv2d` wrapper: a same-padded conv and its activation, hence `.conv.` in every key."""

    def __init__(self, cin: int, cout: int, k: int, prelu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=(k - 1) // 2)
        self.relu = nn.PReLU() if prelu else nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv(x))


def column(cin: int, width: int, k_first: int, k: int, prelu: bool = False) -> nn.Sequential:
    """One MCNN-style column, stride 4: conv, pool, conv (2x width), pool, conv, conv (width / 2 out)."""
    return nn.Sequential(
        Conv(cin, width, k_first, prelu), nn.MaxPool2d(2),
        Conv(width, 2 * width, k, prelu), nn.MaxPool2d(2),
        Conv(2 * width, width, k, prelu), Conv(width, width // 2, k, prelu),
    )


class MCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch1 = column(1, 16, 9, 7)
        self.branch2 = column(1, 20, 7, 5)
        self.branch3 = column(1, 24, 5, 3)
        self.fuse = nn.Sequential(Conv(30, 1, 1))  # ReLU included: the density is never negative

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(torch.cat([self.branch1(x), self.branch2(x), self.branch3(x)], 1))


def build_mcnn() -> CrowdCounter:
    net = Nested("DME", normal_init(MCNN()))
    return CrowdCounter("mcnn", net, stride=4, size_multiple=4, native_channels=1)

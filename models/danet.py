"""DA-Net (Zou et al., IEEE Access 2018) as in BigTeacher-777/DA-Net-Crowd-Counting: grey 0-255, stride 16.

A VGG-16-like trunk, then four deformable 3x3 branches (after conv4, conv5, conv6, conv7) and a plain one
(conv8), summed with learned scalar weights w4..w8.
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from models.counter import CrowdCounter, Nested, normal_init
from models.weights import copy_vgg16

# Plain 3x3 conv stages: name -> (input channels, output channels of convS_1, convS_2, ...).
STAGES = {
    1: (1, (64, 64)), 2: (64, (128, 128)), 3: (128, (256, 256, 256)), 4: (256, (512, 512, 512)),
    5: (512, (512, 512, 512)), 6: (512, (256, 128, 64)), 7: (64, (32, 16, 8)), 8: (8, (4, 2, 1)),
}
DEFORM_CHANNELS = {4: 512, 5: 512, 6: 64, 7: 8}  # deformable branch S reads the features after stage S


class DeformConv2D(nn.Module):
    """The original `DeformConv2D(C, 1, 3, padding=1)` computed with torchvision's `deform_conv2d`.

    Offset layout: the original applies its 9 taps k = 3 * row + col to the raw 18-channel offset map
    read as pairs (channel 2k = row shift, 2k + 1 = column shift); its gather splits those pairs into
    [rows..., cols...] for internal use (its comment states the reverse direction). That pair layout is
    torchvision's (dy, dx) layout, so the offsets pass through unchanged (checked in tests/test_models.py).

    Borders: both read zeros outside the map (the original pads by 1 and clamps), but along an axis of
    size L a sample at u in (-1, 0) reads 0 in the original and (1 + u) * x[0] here, and one at
    u in (L - 1, L) reads x[L - 1] at full weight in the original (it snaps to the floor) and
    (L - u) * x[L - 1] here. Elsewhere, inside [0, L - 1] and beyond those one-pixel bands, they agree.
    (The original also passes no offset gradient for a sample that lies in its padding.)
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        # The original samples a 3x-expanded map and convolves it with stride 3; same weight shape here.
        self.conv_kernel = nn.Conv2d(cin, cout, 3, stride=3, bias=False)

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        # at least float32 under any autocast: torchvision casts it so on CUDA, but has no bfloat16 kernel on the CPU
        dtype = torch.promote_types(torch.promote_types(x.dtype, self.conv_kernel.weight.dtype), torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            return deform_conv2d(x.to(dtype), offset.to(dtype), self.conv_kernel.weight.to(dtype), padding=1)


class DANet(nn.Module):
    def __init__(self):
        super().__init__()
        for s, (cin, widths) in STAGES.items():
            for i, cout in enumerate(widths, 1):
                setattr(self, f"conv{s}_{i}", nn.Conv2d(cin, cout, 3, padding=1))
                cin = cout
        for s, c in DEFORM_CHANNELS.items():
            setattr(self, f"offsets{s}", nn.Conv2d(c, 18, 3, padding=1))
            setattr(self, f"conv{s}", DeformConv2D(c, 1))
        for s in (4, 5, 6, 7, 8):
            setattr(self, f"w{s}", nn.Parameter(torch.ones(1)))

    def _stage(self, s: int, h: Tensor) -> Tensor:
        for i in range(1, len(STAGES[s][1]) + 1):
            h = F.relu(getattr(self, f"conv{s}_{i}")(h))
        return h

    def _deform(self, s: int, h: Tensor) -> Tensor:
        return getattr(self, f"w{s}") * F.relu(getattr(self, f"conv{s}")(h, getattr(self, f"offsets{s}")(h)))

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for s in (1, 2, 3, 4):
            h = F.max_pool2d(self._stage(s, h), 2, ceil_mode=True)
        density = self._deform(4, h)
        for s in (5, 6, 7):
            h = self._stage(s, h)
            density = density + self._deform(s, h)
        return density + self.w8 * self._stage(8, h)

    def vgg_convs(self) -> list[nn.Conv2d]:
        """conv1_1 .. conv5_3, the layers that match VGG-16's 13 convs."""
        return [getattr(self, f"conv{s}_{i + 1}") for s in (1, 2, 3, 4, 5) for i in range(len(STAGES[s][1]))]


def build_danet(vgg_weights: str | Path | None = None) -> CrowdCounter:
    """`vgg_weights`: a local torchvision VGG-16 state-dict file for conv1_1..conv5_3 (conv1_1 keeps only
    VGG's input channel 0, as the original `copy_params_from_vgg16`); else N(0, 0.01)."""
    net = normal_init(DANet())
    if vgg_weights is not None:
        copy_vgg16(net.vgg_convs(), vgg_weights)
    return CrowdCounter("danet", Nested("DA_Net", net), stride=16, size_multiple=16, native_channels=1)

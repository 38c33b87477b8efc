"""CAN (Liu et al., CVPR 2019), CommissarMa's Part-A version (the one the paper cites): CSRNet + scale context."""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.counter import CrowdCounter, normal_init
from models.csrnet import BACKEND, FRONTEND, frontend_convs, make_layers
from models.weights import copy_vgg16

SCALES = (1, 2, 3, 6)


class CANNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.frontend = make_layers(FRONTEND, 3)
        self.backend = make_layers(BACKEND, 1024, dilation=2)  # reads cat(features, context)
        self.output_layer = nn.Conv2d(64, 1, 1)
        self.scale_pools = nn.ModuleList(nn.AdaptiveAvgPool2d(s) for s in SCALES)  # no weights: keys unchanged
        # Per scale S: convS_1 transforms the S x S pooled features, convS_2 weighs their contrast.
        for s in SCALES:
            setattr(self, f"conv{s}_1", nn.Conv2d(512, 512, 1, bias=False))
            setattr(self, f"conv{s}_2", nn.Conv2d(512, 512, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        fv = self.frontend(x)
        weighted = weights = 0
        for s, pool in zip(SCALES, self.scale_pools, strict=True):
            scale = getattr(self, f"conv{s}_1")(pool(fv))
            scale = F.interpolate(scale, size=fv.shape[-2:], mode="bilinear", align_corners=False)
            w = torch.sigmoid(getattr(self, f"conv{s}_2")(scale - fv))
            weighted, weights = weighted + w * scale, weights + w
        context = weighted / (weights + 1e-12)
        return self.output_layer(self.backend(torch.cat([fv, context], 1)))


def build_can(vgg_weights: str | Path | None = None) -> CrowdCounter:
    """`vgg_weights`: a local torchvision VGG-16 state-dict file for the front-end (else N(0, 0.01))."""
    net = normal_init(CANNet())
    if vgg_weights is not None:
        copy_vgg16(frontend_convs(net.frontend), vgg_weights)
    return CrowdCounter("can", net, stride=8, size_multiple=8, native_channels=3)

"""CSRNet (Li et al., CVPR 2018) as in leeyeehoo/CSRNet-pytorch: VGG-16 front, dilated back-end, stride 8."""
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from models.counter import CrowdCounter, normal_init
from models.weights import copy_vgg16

FRONTEND = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)  # VGG-16 conv1_1..conv4_3
BACKEND = (512, 512, 512, 256, 128, 64)


def make_layers(cfg: tuple, cin: int, dilation: int = 1) -> nn.Sequential:
    """3x3 conv + ReLU per number, 2x2 max pool per "M"; Sequential indices match the original keys."""
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


def frontend_convs(frontend: nn.Sequential) -> list[nn.Conv2d]:
    return [m for m in frontend if isinstance(m, nn.Conv2d)]


class CSRNet(nn.Module):
    """`upsample`: CommissarMa's variant, x8 nearest upsampling of the output (stride 1; each 8x8 block
    repeats one value, so it is trained against full-resolution densities)."""

    def __init__(self, upsample: bool = False):
        super().__init__()
        self.frontend = make_layers(FRONTEND, 3)
        self.backend = make_layers(BACKEND, 512, dilation=2)
        self.output_layer = nn.Conv2d(64, 1, 1)  # no ReLU: the density may be negative, as in the original
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        x = self.output_layer(self.backend(self.frontend(x)))
        return F.interpolate(x, scale_factor=8, mode="nearest") if self.upsample else x


def build_csrnet(upsample: bool = False, vgg_weights: str | Path | None = None) -> CrowdCounter:
    """`vgg_weights`: a local torchvision VGG-16 state-dict file for the front-end (else N(0, 0.01))."""
    net = normal_init(CSRNet(upsample))
    if vgg_weights is not None:
        copy_vgg16(frontend_convs(net.frontend), vgg_weights)
    return CrowdCounter("csrnet", net, stride=1 if upsample else 8, size_multiple=8, native_channels=3,
                        model_kwargs={"upsample": upsample})

"""CMTL (Sindagi & Patel, AVSS 2017) as in svishwa/crowdcount-cascaded-mtl: grey 0-255, stride 1."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.counter import CrowdCounter, Nested, normal_init
from models.mcnn import Conv, column

NUM_LEVELS = 10


class FC(nn.Module):
    """svishwa's `FC` wrapper: Linear then PReLU (keys `.fc.` and `.relu.`)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.fc = nn.Linear(cin, cout)
        self.relu = nn.PReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.fc(x))


class CMTL(nn.Module):
    """Density estimator cascaded with a 10-level count classifier (the high-level prior)."""

    def __init__(self):
        super().__init__()
        self.base_layer = nn.Sequential(Conv(1, 16, 9, prelu=True), Conv(16, 32, 7, prelu=True))
        self.hl_prior_1 = column(32, 16, 9, 7, prelu=True)
        self.hl_prior_2 = nn.Sequential(nn.AdaptiveMaxPool2d(32), Conv(8, 4, 1, prelu=True))
        self.hl_prior_fc1 = FC(4 * 32 * 32, 512)
        self.hl_prior_fc2 = FC(512, 256)
        self.hl_prior_fc3 = FC(256, NUM_LEVELS)  # PReLU on the logits, as the original
        self.de_stage_1 = column(32, 20, 7, 5, prelu=True)
        self.de_stage_2 = nn.Sequential(
            Conv(18, 24, 3, prelu=True), Conv(24, 32, 3, prelu=True),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.PReLU(),
            nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), nn.PReLU(),
            Conv(8, 1, 1),  # ReLU output
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """-> (density at input resolution, level logits (N, 10))."""
        base = self.base_layer(x)
        prior = self.hl_prior_1(base)
        h = self.hl_prior_2(prior).flatten(1)
        h = F.dropout(self.hl_prior_fc1(h), training=self.training)
        h = F.dropout(self.hl_prior_fc2(h), training=self.training)
        logits = self.hl_prior_fc3(h)
        density = self.de_stage_2(torch.cat([prior, self.de_stage_1(base)], 1))
        return density, logits


def build_cmtl(level_width: float = 100.0) -> CrowdCounter:
    """`level_width`: count per density level of the auxiliary classifier (original: max train count / 10)."""
    net = Nested("CCN", normal_init(CMTL()))
    return CrowdCounter("cmtl", net, stride=1, size_multiple=4, native_channels=1,
                        model_kwargs={"level_width": level_width}, level_width=level_width)

"""`CrowdCounter`: one wrapper that gives all six networks the same [0, 1] RGB interface; each converts it to its
native input (grey 0–255 for MCNN, CMTL and DA-Net; ImageNet-normalised RGB for CSRNet and CAN)."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.errors import ToolkitError

LUMA = (0.299, 0.587, 0.114)  # OpenCV's grey conversion, which the grey originals were trained on
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LEVEL_LOSS_WEIGHT = 1e-4  # CMTL: loss = MSE + 1e-4 * BCE on the density level


class Nested(nn.Module):
    """Holds a network under the attribute name of the original (`DME`, `CCN`, `DA_Net`), kept in its keys."""

    def __init__(self, attr: str, module: nn.Module):
        super().__init__()
        self.attr = attr
        self.add_module(attr, module)

    def forward(self, x: Tensor):
        return getattr(self, self.attr)(x)


def normal_init(net: nn.Module, std: float = 0.01) -> nn.Module:
    """The originals' init: Conv2d and Linear weights ~ N(0, std), Conv2d biases 0.

    Transposed convs (not Conv2d subclasses) and Linear biases keep PyTorch's default, as in svishwa's
    `weights_normal_init`; PReLU slopes start at PyTorch's 0.25.
    """
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return net


def density_level_loss(logits: Tensor, counts: Tensor, level_width: Tensor | float) -> Tensor:
    """CMTL's auxiliary term: BCE between softmax(logits) and the one-hot level round(count / width), clipped.

    The original weights the 10 classes by the inverse of their training-set frequency; we use uniform
    weights, which only rescales the (1e-4-weighted) term.
    """
    levels = (counts / level_width).round().clamp(0, logits.shape[1] - 1).long()
    target = F.one_hot(levels, logits.shape[1]).float()
    # BCE is banned under autocast (fp16 log overflows): compute it in float32 outside of it.
    with torch.autocast(logits.device.type, enabled=False):
        return F.binary_cross_entropy(logits.float().softmax(1), target)


class CrowdCounter(nn.Module):
    """An original network `.net` behind one interface: x (N, 3, H, W) in [0, 1] RGB -> density map.

    The density has shape (N, 1, H // stride, W // stride); H and W must be multiples of `size_multiple`.
    A `.net` that returns (density, level_logits) (CMTL) gets the density-level term in `loss`.
    """

    def __init__(self, name: str, net: nn.Module, *, stride: int, size_multiple: int, native_channels: int,
                 model_kwargs: dict | None = None, level_width: float | None = None):
        super().__init__()
        self.name, self.net = name, net
        self.stride, self.size_multiple, self.native_channels = stride, size_multiple, native_channels
        self.model_kwargs = dict(model_kwargs or {})
        # Pixel constants are non-persistent buffers: they follow .to(device) but stay out of checkpoints. Shaped
        # (3, 1, 1), not (1, 3, 1, 1): a channels-last model would give a 4-D one strides that alias its elements,
        # which DistributedDataParallel's buffer broadcast refuses.
        if native_channels == 1:
            self.register_buffer("luma", 255 * torch.tensor(LUMA).view(3, 1, 1), persistent=False)
        else:
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        if level_width is not None:
            self.register_buffer("level_width", torch.tensor(float(level_width)), persistent=False)

    def to_native(self, x: Tensor) -> Tensor:
        """[0, 1] RGB -> the original's input: grey raw 0-255 (1 channel) or ImageNet-normalised RGB."""
        if self.native_channels == 1:
            return (x * self.luma).sum(1, keepdim=True)
        return (x - self.mean) / self.std

    def _outputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ToolkitError(f"{self.name} expects an (N, 3, H, W) RGB batch, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ToolkitError(f"{self.name} needs H and W multiples of {self.size_multiple}, got {h}x{w}")
        out = self.net(self.to_native(x))
        return out if isinstance(out, tuple) else (out, None)

    def forward(self, x: Tensor) -> Tensor:
        return self._outputs(x)[0]

    def adapt_to_counts(self, counts) -> None:
        """Set what depends on the training set's counts before training: CMTL's 10 density-level classes split
        them evenly (its level width); nothing for the other networks."""
        if hasattr(self, "level_width"):
            self.level_width.fill_(max(float(max(counts)) / 10, 1.0))

    def count(self, x: Tensor) -> Tensor:
        """Predicted head count per image, shape (N,)."""
        return self(x).sum(dim=(1, 2, 3))

    def loss(self, x: Tensor, target: Tensor, count_weight: float = 0.0) -> Tensor:
        """Training loss against a target density at the output resolution: summed MSE per image, plus
        `count_weight` times the mean absolute count error of the crops."""
        pred, logits = self._outputs(x)
        if pred.shape != target.shape:
            raise ToolkitError(f"{self.name} target density must have shape {tuple(pred.shape)}, "
                               f"got {tuple(target.shape)}")
        loss = F.mse_loss(pred, target, reduction="sum") / x.shape[0]  # float32 under autocast
        if count_weight:  # the MSE barely sees an offset spread over thousands of cells; the count sees all of it
            loss = loss + count_weight * (pred.float().sum((1, 2, 3)) - target.float().sum((1, 2, 3))).abs().mean()
        if logits is not None:
            counts = target.float().sum(dim=(1, 2, 3))
            loss = loss + LEVEL_LOSS_WEIGHT * density_level_loss(logits, counts, self.level_width)
        return loss

"""The receptive field of a counting network, measured structurally: which input pixels an output cell can depend
on, whatever the weights (a dead ReLU in a trained net would hide a dependency from its gradients).

The network is copied with every weight set to a positive constant and every bias to zero, its activations and
batch norms (per-channel affine maps in eval mode, whose signs could cancel paths) made the identity and its max
pooling average pooling: the copy is linear with positive coefficients along every path
of the original, so the gradient of one output cell is non-zero exactly on the pixels some path reaches. Input
sizes grow until the support of a central cell stops touching the border; a support that always does is global.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from utils.errors import ToolkitError

MAX_SIDE = 2048  # a support still touching the border of an input this large is taken as global
# Consecutive output cells measured: their fields must repeat with a period dividing this (×4 for CMTL's transposed
# convolutions, ×8 for CSRNet's nearest upsampling), or a cell left unmeasured could see more than the field says.
PERIOD = 16


@dataclass(frozen=True)
class ReceptiveField:
    """Output cell (i, j) sees the input rows i·stride + offset .. i·stride + offset + side − 1 (and so for columns),
    clipped to the image."""

    side: int
    stride: int
    offset: int

    def window(self, patch_side: int) -> int:
        """Cells per axis a patch within a `patch_side` square can reach: the most integers j with
        j·stride + offset + side − 1 ≥ a and j·stride + offset ≤ a + patch_side − 1, over every position a."""
        return (patch_side + self.side - 2) // self.stride + 1


class GlobalFieldError(ToolkitError):
    """The network's output cells can depend on the whole image: no receptive-field certificate exists."""


def _deformable(net: nn.Module) -> list[str]:
    return [name for name, m in net.named_modules() if "deform" in type(m).__name__.lower()]


def _global_pooling(net: nn.Module) -> list[str]:
    kinds = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    return [name for name, m in net.named_modules() if isinstance(m, kinds)]


def structural_copy(net: nn.Module) -> nn.Module:
    """`net` with positive averaging weights, zero biases, identity activations and batch norms, and average
    pooling."""
    twin = copy.deepcopy(net).float().eval()
    for name, module in list(twin.named_modules()):
        replacement = None
        if isinstance(module, (nn.ReLU, nn.PReLU, nn.LeakyReLU, nn.Sigmoid, nn.Dropout, nn.BatchNorm2d)):
            replacement = nn.Identity()
        elif isinstance(module, nn.MaxPool2d):
            replacement = nn.AvgPool2d(module.kernel_size, module.stride, module.padding, module.ceil_mode)
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            with torch.no_grad():
                module.weight.fill_(1.0 / module.weight[0].numel())  # an average: values stay near 1
                if module.bias is not None:
                    module.bias.zero_()
        if replacement is not None:
            parent, _, attr = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, attr, replacement)
    return twin.requires_grad_(False)


@torch.enable_grad()  # also when called under no_grad
def _supports(twin: nn.Module, channels: int, side: int, cells: list[int]) -> list[tuple[int, int]]:
    """Per output cell (c, c) of `cells`: the first and last input row or column it depends on, for a side×side
    input (the union of both axes)."""
    x = torch.ones(1, channels, side, side, requires_grad=True)
    out = twin(x)
    out = out[0] if isinstance(out, tuple) else out  # CMTL: (density, level logits)
    spans = []
    for k, c in enumerate(cells):
        (grad,) = torch.autograd.grad(out[0, 0, c, c], x, retain_graph=k < len(cells) - 1)
        hit = grad[0].abs().sum(0) > 0
        rows, cols = hit.any(1).nonzero().flatten(), hit.any(0).nonzero().flatten()
        spans.append((int(min(rows[0], cols[0])), int(max(rows[-1], cols[-1]))))
    return spans


def receptive_field(model, start: int = 128, max_side: int = MAX_SIDE) -> ReceptiveField:
    """The receptive field of a `CrowdCounter`'s density output; `GlobalFieldError` naming the layer responsible
    when it has none (deformable convolutions: offsets unbounded; pooling of the whole map).

    Where neighbouring cells' fields are not evenly spaced (CMTL's transposed convolutions), the field returned is
    the smallest evenly spaced one that holds each of `PERIOD` consecutive cells' fields.
    """
    net, stride, name = model.net, model.stride, model.name
    deformable = _deformable(net)
    if deformable:
        raise GlobalFieldError(f"{name} has no bounded receptive field: its deformable convolutions "
                               f"({', '.join(deformable)}) sample at learned, unbounded offsets")
    twin, pooling, whole = structural_copy(net), _global_pooling(net), 0
    side = start
    while side <= max_side:
        side = side // model.size_multiple * model.size_multiple
        cells_per_side = side // stride
        centre = cells_per_side // 2
        cells = list(range(max(centre - PERIOD // 2, 0), min(centre + PERIOD // 2, cells_per_side)))
        spans = _supports(twin, model.native_channels, side, cells)
        if len(cells) == PERIOD and all(0 < lo and hi < side - 1 for lo, hi in spans):
            offset = min(lo - c * stride for (lo, _), c in zip(spans, cells, strict=True))
            end = max(hi - c * stride for (_, hi), c in zip(spans, cells, strict=True))
            return ReceptiveField(end - offset + 1, stride, offset)
        whole = whole + 1 if spans[0] == (0, side - 1) else 0
        if pooling and whole == 2:  # all of the input, twice in a row, behind a whole-map pooling: global
            break
        side *= 2
    layer = f"its whole-map pooling ({', '.join(pooling)})" if pooling else "a layer that mixes the whole map"
    raise GlobalFieldError(f"{name} has no bounded receptive field: {layer} lets every output cell see the whole "
                           "image")

"""The receptive field of a counting network, measured structurally: which input pixels an output cell can depend
on, whatever the weights (a dead ReLU in a trained net would hide a dependency from its gradients).

The network runs under `Structural`, a torch function mode that rewrites every operation it calls, module or
functional: convolutions and linear maps get positive averaging weights and no bias, activations and batch norm in
eval mode (a per-channel affine map) become the identity, max pooling becomes average pooling over the same
(dilated) window, the maximum of two maps their sum, and pixel (un)shuffles a mix of all their phases. The result is
linear with positive coefficients along every path of the original, so the gradient of one output cell is non-zero
exactly on the pixels some path reaches. An operation whose dependencies carry no gradient (a comparison, rounding,
a selection, `detach`) or that is not local (batch statistics, instance / layer / group norm, non-zero padding that
wraps or mirrors, data-dependent sampling) is refused, naming it. Input sizes grow until the support of the
measured cells stops touching the border; a support that always does is global, and a field that changes with the
input size (adaptive pooling) is refused.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from utils.errors import ToolkitError

MAX_SIDE = 2048  # a support still touching the border of an input this large is taken as global
# Consecutive output cells measured at first; doubled until the cells' fields repeat within them (×4 for CMTL's
# transposed convolutions, ×8 for CSRNet's nearest upsampling), so no phase of the pattern is left unmeasured.
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


class UnmeasurableFieldError(GlobalFieldError):
    """The network uses an operation whose field the structural measurement cannot see: no certificate is given."""


def _deformable(net: nn.Module) -> list[str]:
    return [name for name, m in net.named_modules() if "deform" in type(m).__name__.lower()]


def _global_pooling(net: nn.Module) -> list[str]:
    kinds = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    return [name for name, m in net.named_modules() if isinstance(m, kinds)]


IDENTITY = frozenset({
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "prelu", "rrelu", "rrelu_", "sigmoid", "sigmoid_", "tanh",
    "tanh_", "hardtanh", "hardtanh_", "elu", "elu_", "selu", "celu", "gelu", "silu", "mish", "softplus",
    "hardsigmoid", "hardswish", "logsigmoid", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "clip",
    "clip_"})
WEIGHTED = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                      "linear"})
NO_GRADIENT = frozenset({
    "gt", "ge", "lt", "le", "eq", "ne", "greater", "greater_equal", "less", "less_equal", "not_equal", "__gt__",
    "__ge__", "__lt__", "__le__", "__eq__", "__ne__", "round", "round_", "floor", "floor_", "ceil", "ceil_", "trunc",
    "trunc_", "sign", "sgn", "heaviside", "argmax", "argmin", "topk", "sort", "argsort", "kthvalue", "median",
    "nanmedian", "mode", "quantile", "nanquantile", "detach", "detach_", "where", "masked_fill", "masked_fill_",
    "masked_select", "masked_scatter", "bucketize", "searchsorted", "nonzero", "unique", "floor_divide",
    "remainder", "fmod", "max_unpool2d", "gather", "index_select", "take", "take_along_dim"})
NOT_LOCAL = {
    "instance_norm": "instance norm (statistics of the whole map)", "layer_norm": "layer norm (statistics of the "
    "whole map)", "group_norm": "group norm (statistics of the whole map)", "local_response_norm": "local response "
    "norm", "grid_sample": "grid sampling (data-dependent positions)", "deform_conv2d": "a deformable convolution "
    "(offsets unbounded)", "lp_pool2d": "power-average pooling", "fractional_max_pool2d": "fractional max pooling "
    "(random windows)"}


def _arg(args: tuple, kwargs: dict, index: int, name: str, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


class Structural(TorchFunctionMode):
    """Runs a network as its structural copy (see the module docstring); `adaptive` records whether it pooled
    adaptively (a field that may grow with the input)."""

    def __init__(self):
        super().__init__()
        self.adaptive = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs, name = kwargs or {}, getattr(func, "__name__", "")
        if name in IDENTITY:
            return args[0] if args else kwargs["input"]
        if name in WEIGHTED:
            weight = _arg(args, kwargs, 1, "weight")
            args, kwargs = list(args), dict(kwargs)
            averaging = torch.full_like(weight, 1.0 / weight[0].numel())  # positive: values stay near 1
            if len(args) > 1:
                args[1] = averaging
            else:
                kwargs["weight"] = averaging
            if len(args) > 2:
                args[2] = None
            kwargs.pop("bias", None)
            return func(*args, **kwargs)
        if name == "max_pool2d":
            x, k = args[0], _arg(args, kwargs, 1, "kernel_size")
            stride, padding = _arg(args, kwargs, 2, "stride") or k, _arg(args, kwargs, 3, "padding", 0)
            dilation, ceil = _arg(args, kwargs, 4, "dilation", 1), _arg(args, kwargs, 5, "ceil_mode", False)
            if _arg(args, kwargs, 6, "return_indices", False):
                raise UnmeasurableFieldError("max pooling with indices: its field cannot be measured structurally")
            if dilation in (1, (1, 1)):
                return F.avg_pool2d(x, k, stride, padding, ceil)
            if ceil:
                raise UnmeasurableFieldError("dilated max pooling with ceil_mode: its field cannot be measured")
            kh, kw = (k, k) if isinstance(k, int) else k
            window = x.new_full((x.shape[1], 1, kh, kw), 1.0 / (kh * kw))
            return F.conv2d(x, window, None, stride, padding, dilation, groups=x.shape[1])
        if name in ("adaptive_max_pool2d", "adaptive_avg_pool2d"):
            self.adaptive = True
            return F.adaptive_avg_pool2d(args[0], _arg(args, kwargs, 1, "output_size"))
        if name in ("maximum", "minimum", "fmax", "fmin") or (name in ("max", "min") and len(args) == 2
                                                               and isinstance(args[1], torch.Tensor)):
            return args[0] + args[1]  # both sides reach the output
        if name in ("max", "min", "amax", "amin") and (len(args) > 1 or "dim" in kwargs):
            if name in ("max", "min"):
                raise UnmeasurableFieldError(f"torch.{name} along a dimension selects one input (its gradient "
                                             "hides the others): use amax / amin")
            return args[0].sum(_arg(args, kwargs, 1, "dim"), keepdim=_arg(args, kwargs, 2, "keepdim", False))
        if name == "batch_norm":
            if _arg(args, kwargs, 5, "training", False) or _arg(args, kwargs, 1, "running_mean") is None:
                raise UnmeasurableFieldError("batch norm with batch statistics (training mode, or no running "
                                             "statistics) mixes every image and position of a batch")
            return args[0]
        if name == "pad" and _arg(args, kwargs, 2, "mode", "constant") != "constant":
            raise UnmeasurableFieldError(f"{_arg(args, kwargs, 2, 'mode')} padding wraps or mirrors the border: "
                                         "the field is measured for zero padding only")
        if name == "interpolate" and _arg(args, kwargs, 3, "mode", "nearest") in ("bicubic",):
            raise UnmeasurableFieldError("bicubic interpolation (negative weights could hide a dependency)")
        if name == "pixel_shuffle":  # every sub-position takes every channel of its group: a superset of the phases
            x, r = args[0], _arg(args, kwargs, 1, "upscale_factor")
            n, c, h, w = x.shape
            return F.interpolate(x.view(n, c // (r * r), r * r, h, w).mean(2), scale_factor=r, mode="nearest")
        if name == "pixel_unshuffle":
            x, r = args[0], _arg(args, kwargs, 1, "downscale_factor")
            return F.avg_pool2d(x, r).repeat_interleave(r * r, dim=1)
        if name in NO_GRADIENT:
            raise UnmeasurableFieldError(f"the operation {name} carries no gradient to all the pixels it depends on "
                                         "(a comparison, rounding or selection): its field cannot be measured")
        if name in NOT_LOCAL:
            raise UnmeasurableFieldError(f"{NOT_LOCAL[name]} is not local: no receptive-field certificate")
        return func(*args, **kwargs)


def structural_copy(net: nn.Module) -> nn.Module:
    """A float32 copy of `net` on the CPU (where the probe inputs are, whatever device `net` is on), in eval mode,
    with no gradients of its own; run it under `Structural`."""
    return copy.deepcopy(net).float().cpu().eval().requires_grad_(False)


@torch.enable_grad()  # also when called under no_grad
def _supports(twin: nn.Module, channels: int, side: int, cells: list[int]) -> tuple[list[tuple[int, int]], bool]:
    """Per output cell (c, c) of `cells`: the first and last input row or column it depends on, for a side×side
    input (the union of both axes); and whether the network pooled adaptively."""
    x = torch.ones(1, channels, side, side, requires_grad=True)
    with Structural() as mode:
        out = twin(x)
    out = out[0] if isinstance(out, tuple) else out  # CMTL: (density, level logits)
    spans = []
    for k, c in enumerate(cells):
        (grad,) = torch.autograd.grad(out[0, 0, c, c], x, retain_graph=k < len(cells) - 1)
        hit = grad[0].abs().sum(0) > 0
        rows, cols = hit.any(1).nonzero().flatten(), hit.any(0).nonzero().flatten()
        spans.append((int(min(rows[0], cols[0])), int(max(rows[-1], cols[-1]))))
    return spans, mode.adaptive


def _measure(model, twin: nn.Module, side: int, period: int, pooling: list[str], max_side: int,
             recheck: bool = True) -> tuple[ReceptiveField | None, int]:
    """(the field measured over `period` consecutive cells at the first side from `side` where their supports stay
    inside the input, or None where they never do; that side). After adaptive pooling (and with `recheck`), the
    same field must be measured on an input twice as large."""
    stride, whole = model.stride, 0
    while side <= max_side:
        side = side // model.size_multiple * model.size_multiple
        cells_per_side = side // stride
        centre = cells_per_side // 2
        cells = list(range(max(centre - period // 2, 0), min(centre + period // 2, cells_per_side)))
        spans, adaptive = _supports(twin, model.native_channels, side, cells)
        if len(cells) == period and all(0 < lo and hi < side - 1 for lo, hi in spans):
            relative = [(lo - c * stride, hi - c * stride) for (lo, hi), c in zip(spans, cells, strict=True)]
            if relative[:period // 2] != relative[period // 2:]:  # the pattern does not repeat within the cells
                return _measure(model, twin, side, 2 * period, pooling, max_side, recheck)
            offset, end = min(lo for lo, _ in relative), max(hi for _, hi in relative)
            field = ReceptiveField(end - offset + 1, stride, offset)
            if adaptive and recheck and _measure(model, twin, 2 * side, period, pooling, 2 * side, False)[0] != field:
                raise UnmeasurableFieldError(f"{model.name}'s adaptive pooling gives a receptive field that grows "
                                             "with the image: no certificate")
            return field, side
        whole = whole + 1 if spans[0] == (0, side - 1) else 0
        if pooling and whole == 2:  # all of the input, twice in a row, behind a whole-map pooling: global
            break
        side *= 2
    return None, side


def receptive_field(model, start: int = 128, max_side: int = MAX_SIDE) -> ReceptiveField:
    """The receptive field of a `CrowdCounter`'s density output; `GlobalFieldError` naming the layer or operation
    responsible when it has none or it cannot be measured (deformable convolutions: offsets unbounded; pooling of
    the whole map; an operation `Structural` refuses).

    Where neighbouring cells' fields are not evenly spaced (CMTL's transposed convolutions, CSRNet's upsampling),
    the field returned is the smallest evenly spaced one that holds the field of every cell of a whole period of
    the pattern (at least `PERIOD` cells, doubled until the pattern repeats). Rows and columns are measured
    together on diagonal cells: their structure is taken to be the same along both axes.
    """
    net, name = model.net, model.name
    deformable = _deformable(net)
    if deformable:
        raise GlobalFieldError(f"{name} has no bounded receptive field: its deformable convolutions "
                               f"({', '.join(deformable)}) sample at learned, unbounded offsets")
    pooling = _global_pooling(net)
    try:
        field, _ = _measure(model, structural_copy(net), start, PERIOD, pooling, max_side)
    except UnmeasurableFieldError as e:
        raise UnmeasurableFieldError(f"{name} has no measurable receptive field: {e}") from None
    if field is None:
        layer = f"its whole-map pooling ({', '.join(pooling)})" if pooling else "a layer that mixes the whole map"
        raise GlobalFieldError(f"{name} has no bounded receptive field: {layer} lets every output cell see the whole "
                               "image")
    return field

"""The six networks: sizes, shapes, pixel map, training step, and DA-Net's deformable conv vs the original."""
import pytest
import torch
import torch.nn.functional as F

from models import MODEL_NAMES, build
from models.danet import DeformConv2D
from utils.errors import ToolkitError

# the originals' sizes; smallfield's is its own design's (3x3 and 1x1 convolutions, widths 24/48/96)
PARAMS = {"mcnn": 127_953, "cmtl": 2_453_619, "csrnet": 16_263_489, "can": 20_719_937, "danet": 16_474_398,
          "smallfield": 303_097}
STRIDES = {"mcnn": 4, "csrnet": 8, "can": 8, "cmtl": 1, "danet": 16, "smallfield": 4}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_count(name):
    assert sum(p.numel() for p in build(name).parameters()) == PARAMS[name]


def test_registry_names_aliases_and_errors():
    assert MODEL_NAMES == ("mcnn", "csrnet", "can", "cmtl", "danet", "smallfield")
    assert build("DA-Net").name == build("da_net").name == "danet"
    assert build("MCNN").name == "mcnn"
    with pytest.raises(ToolkitError, match="mcnn, csrnet, can, cmtl, danet, smallfield"):
        build("resnet")
    with pytest.raises(ToolkitError, match="upsample"):
        build("mcnn", upsample=True)


def test_csrnet_upsample_gives_stride_1_nearest_copy():
    torch.manual_seed(0)
    plain, up = build("csrnet"), build("csrnet", upsample=True)
    up.net.load_state_dict(plain.net.state_dict())
    assert (up.stride, up.model_kwargs) == (1, {"upsample": True})
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(up(x), plain(x).repeat_interleave(8, 2).repeat_interleave(8, 3))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shape_and_one_adam_step(name):
    torch.manual_seed(1)
    model = build(name).train()
    assert model.stride == STRIDES[name]
    x = torch.rand(2, 3, 64, 64)
    s = 64 // model.stride
    target = 0.01 * torch.rand(2, 1, s, s)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    torch.manual_seed(2)  # the same dropout masks (CMTL) for the loss before and after the step
    loss = model.loss(x, target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        assert model(x).shape == (2, 1, s, s)
        torch.manual_seed(2)
        assert model.loss(x, target) < loss
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    assert sum(changed) >= 0.8 * len(changed)


def test_size_rule_is_enforced():
    with pytest.raises(ToolkitError, match="multiples of 16"):
        build("danet")(torch.rand(1, 3, 64, 72))


def test_to_native_matches_the_pixel_formulas():
    rgb = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
    grey = 255 * (0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6)  # 92.565
    for name in ("mcnn", "cmtl", "danet"):
        torch.testing.assert_close(build(name).to_native(rgb), torch.tensor(grey).view(1, 1, 1, 1))
    imagenet = [(0.2 - 0.485) / 0.229, (0.4 - 0.456) / 0.224, (0.6 - 0.406) / 0.225]
    for name in ("csrnet", "can", "smallfield"):
        torch.testing.assert_close(build(name).to_native(rgb), torch.tensor(imagenet).view(1, 3, 1, 1))


def test_input_gradient_and_autocast():
    torch.manual_seed(1)  # the originals' N(0, 0.01) init leaves MCNN's output all zero for some seeds (0 among them)
    model = build("mcnn").eval()
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    model.count(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    cmtl = build("cmtl")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cmtl.loss(torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    danet = build("danet").eval()  # torchvision's deform_conv2d has no bfloat16 CPU kernel: the model runs it in fp32
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = danet(image)
    assert torch.isfinite(fast).all() and fast.shape == danet(image).shape


def test_cmtl_loss_adds_the_density_level_term():
    torch.manual_seed(0)
    model = build("cmtl").double().eval()  # eval: no dropout, so the logits can be recomputed below
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    target = torch.zeros(2, 1, 32, 32, dtype=torch.float64)
    target[0, :, :10, :3], target[1, :, :19, :23] = 1.0, 1.0  # counts 30 and 437

    def expected_bce(levels):
        p = logits.softmax(1)
        onehot = F.one_hot(torch.tensor(levels), 10).double()
        return -(onehot * p.log() + (1 - onehot) * (1 - p).log()).mean()

    with torch.no_grad():
        density, logits = model.net(model.to_native(x))
        mse = ((density - target) ** 2).sum() / 2
        aux = model.loss(x, target) - mse
        assert aux > 0
        torch.testing.assert_close(aux, 1e-4 * expected_bce([0, 4]), rtol=1e-5, atol=0)  # round(0.3), round(4.37)
        model.level_width.fill_(40.0)
        aux = model.loss(x, target) - mse
        torch.testing.assert_close(aux, 1e-4 * expected_bce([1, 9]), rtol=1e-5, atol=0)  # 0.75, 10.9 clipped


# --- DA-Net's deformable conv against the original repository's pure-PyTorch DeformConv2D -------------------

def original_deform_conv(x, raw_offset, weight):
    """The original DeformConv2D(C, O, 3, padding=1) forward, restated: the raw 18-channel offsets are
    gathered as [0, 2, .., 16, 1, 3, .., 17] (first 9 = row shifts of taps k = 3*row + col, last 9 = column
    shifts), sampled bilinearly on the zero-padded map with the original's clamping, laid out as 3x3
    blocks and convolved with stride 3."""
    n, c, h, w = x.shape
    xp = F.pad(x, (1, 1, 1, 1)).flatten(2)
    off = raw_offset[:, torch.cat([torch.arange(0, 18, 2), torch.arange(1, 18, 2)])]
    k = torch.arange(9).view(1, 9, 1, 1)
    rows = torch.arange(h).view(1, 1, h, 1) + 1 + (k // 3 - 1) + off[:, :9]  # padded coordinates
    cols = torch.arange(w).view(1, 1, 1, w) + 1 + (k % 3 - 1) + off[:, 9:]

    def corners(p, size):  # -> low/high integer corners and their bilinear weights along one axis
        low, high = p.floor().clamp(0, size - 1), (p.floor() + 1).clamp(0, size - 1)
        in_padding = (p < 1) | (p > size - 2)
        p = torch.where(in_padding, p.floor(), p).clamp(0, size - 1)
        return (low, 1 + (low - p)), (high, 1 - (high - p))

    def at(r, q):
        index = (r * (w + 2) + q).long().flatten(1).unsqueeze(1).expand(-1, c, -1)
        return xp.gather(2, index).view(n, c, 9, h, w)

    sampled = sum((gr * gq).unsqueeze(1) * at(r, q)
                  for r, gr in corners(rows, h + 2) for q, gq in corners(cols, w + 2))
    blocks = sampled.view(n, c, 3, 3, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, 3 * h, 3 * w)
    return F.conv2d(blocks, weight, stride=3)


def test_deform_conv_equals_the_original_where_borders_agree():
    torch.manual_seed(0)
    n, c, h, w = 2, 3, 5, 6
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    dy, dx = 1.5 * torch.randn(2, n, 9, h, w, dtype=torch.float64)
    k = torch.arange(9).view(1, 9, 1, 1)
    # Sample positions in the one-pixel bands (-1, 0) and (L - 1, L) are read differently (see DeformConv2D);
    # snap those to the nearest integer, keeping every other (fractional, inside or far outside) position.
    for d, base, size in ((dy, torch.arange(h).view(1, 1, h, 1) + k // 3 - 1, h),
                          (dx, torch.arange(w).view(1, 1, 1, w) + k % 3 - 1, w)):
        u = base + d
        band = ((u > -1) & (u < 0)) | ((u > size - 1) & (u < size))
        d.copy_(torch.where(band, u.round(), u) - base)
    raw = torch.stack([dy, dx], 2).reshape(n, 18, h, w)  # pairs per tap: the offsets conv's output order
    layer = DeformConv2D(c, 2).double()
    ours = layer(x, raw)
    ref = original_deform_conv(x, raw, layer.conv_kernel.weight)
    assert ours.shape == ref.shape == (n, 2, h, w)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert ref.abs().mean() > 0.1  # not trivially zero


def test_deform_conv_border_difference_from_the_original():
    h, w = 4, 5
    x = torch.rand(1, 1, h, w, dtype=torch.float64) + 1
    layer = DeformConv2D(1, 1).double()
    with torch.no_grad():
        layer.conv_kernel.weight.zero_()[0, 0, 1, 1] = 1  # the output is the centre tap's sample
    raw = torch.zeros(1, 18, h, w, dtype=torch.float64)
    raw[0, 8, h - 1, 2] = 0.25  # centre tap (k = 4) row shift: bottom row samples at row h - 0.75
    raw[0, 8, 0, 2] = -0.25  # top row samples at row -0.25
    ours, ref = layer(x, raw)[0, 0], original_deform_conv(x, raw, layer.conv_kernel.weight)[0, 0]
    torch.testing.assert_close(ref[h - 1, 2], x[0, 0, h - 1, 2])  # original: floor, full weight
    torch.testing.assert_close(ours[h - 1, 2], 0.75 * x[0, 0, h - 1, 2])  # torchvision: blends with the zero pad
    torch.testing.assert_close(ref[0, 2], torch.tensor(0.0, dtype=torch.float64))  # original: zero
    torch.testing.assert_close(ours[0, 2], 0.75 * x[0, 0, 0, 2])
    same = torch.ones(h, w, dtype=torch.bool)
    same[h - 1, 2] = same[0, 2] = False
    torch.testing.assert_close(ours[same], x[0, 0][same])
    torch.testing.assert_close(ref[same], x[0, 0][same])


def test_smallfield_without_batch_norm_computes_the_same_in_training_and_in_eval():
    model = build("smallfield", norm=False, seed=0)
    assert model.model_kwargs == {"width": 24, "norm": False}  # the defaults left out, as older checkpoints have it
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained, evaluated = model.train()(x), model.eval()(x)
    torch.testing.assert_close(trained.clamp_min(0), evaluated)  # only the output's leak differs
    with_norm = build("smallfield", seed=0)
    with torch.no_grad():
        assert not torch.allclose(with_norm.train()(x), with_norm.eval()(x))  # batch statistics against running ones


@pytest.mark.parametrize("norm", [True, False])
def test_a_deepened_smallfield_counts_as_before_with_a_wider_field_and_trains_its_new_blocks(norm):
    from models.receptive_field import receptive_field
    from models.smallfield import deepened

    model = build("smallfield", norm=norm, width=4, seed=0)
    with torch.no_grad():  # a trained model's statistics and head, not the init's (whose output may be all zero)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2), m.bias.uniform_(-0.1, 0.3)
        model.net.head[-2].bias.fill_(0.5)
    grown = deepened(model, 3)
    assert grown.model_kwargs["blocks"] == 3 and receptive_field(grown.eval()).side == 33 + 2 * 16
    x = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = model.eval()(x), grown(x)
    assert before.sum() > 0 and torch.equal(before, after)
    grown.train().loss(x, torch.full((2, 1, 16, 20), 0.01)).backward()
    for block in grown.net.features[5:7]:  # the two added blocks: their zeroed last layer has a gradient
        assert block.body[-1 if norm else -2].weight.grad.abs().sum() > 0
    assert deepened(model, 1) is model
    state = torch.random.get_rng_state()
    again, other = deepened(model, 3, seed=5), deepened(model, 3, seed=5)  # the new blocks' init: drawn by the seed
    assert torch.equal(torch.random.get_rng_state(), state)  # and the global RNG not moved
    assert all(torch.equal(v, other.net.state_dict()[k]) for k, v in again.net.state_dict().items())
    with pytest.raises(ToolkitError, match="may add blocks, not remove them"):
        deepened(grown, 2)
    with pytest.raises(ToolkitError, match="mcnn has no option blocks"):
        deepened(build("mcnn"), 2)


def test_smallfield_output_is_never_negative_and_never_dies():
    model = build("smallfield", seed=0)
    with torch.no_grad():
        model.net.head[-2].bias.fill_(-100.0)  # every output cell pushed below zero, as early training can do
    x = torch.rand(2, 3, 64, 64)
    assert model.eval()(x).min() == 0  # served densities: clipped at zero
    loss = model.train().loss(x, torch.full((2, 1, 16, 16), 0.01))
    loss.backward()
    assert model.net.head[-2].bias.grad.abs() > 0  # training still has a gradient to bring them back


def test_the_count_term_adds_the_mean_absolute_count_error_of_the_crops():
    torch.manual_seed(0)
    model = build("smallfield").double().eval()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    target = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 0.2
    with torch.no_grad():
        pred = model(x)
        mse = ((pred - target) ** 2).sum() / 3
        count_error = (pred.sum((1, 2, 3)) - target.sum((1, 2, 3))).abs().mean()
        torch.testing.assert_close(model.loss(x, target), mse)
        torch.testing.assert_close(model.loss(x, target, count_weight=0.5), mse + 0.5 * count_error)

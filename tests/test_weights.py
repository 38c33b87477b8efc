"""Weight files: the real MCNN releases (26 keys), original layouts, own checkpoints, errors."""
import h5py
import numpy as np
import pytest
import torch

from models import DISPLAY_NAMES, MODEL_NAMES, build, checkpoint_state, load_weights
from models.weights import WrongModel, load_state
from utils.errors import ToolkitError

MCNN_FILES = {"mcnn_shtechA_count": "mcnn_shtechA_660.h5", "mcnn_shtechB_count": "mcnn_shtechB_110.h5"}


def save_h5(path, state):
    with h5py.File(path, "w") as f:
        for k, v in state.items():
            f.create_dataset(k, data=v.numpy())


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("file", MCNN_FILES.values())
def test_real_mcnn_files_load_by_exact_name(shared_dir, file):
    path = shared_dir / "weights" / file
    model = build("mcnn", weights=path)
    with h5py.File(path, "r") as f:
        stored = {k: torch.from_numpy(np.asarray(f[k])) for k in f}
    assert len(stored) == 26
    assert same_state(model.net.state_dict(), stored)


def test_official_csrnet_checkpoint_and_plain_state_dict(tmp_path):
    torch.manual_seed(0)
    original = build("csrnet")
    state = original.net.state_dict()
    official = {"epoch": 7, "arch": "csrnet", "best_prec1": 66.4, "optimizer": {"state": {}, "param_groups": []},
                "state_dict": {"module." + k: v for k, v in state.items()}}
    torch.save(official, tmp_path / "PartAmodel_best.pth.tar")
    torch.save(state, tmp_path / "plain.pth")
    for file in ("PartAmodel_best.pth.tar", "plain.pth"):
        assert same_state(build("csrnet", weights=tmp_path / file).net.state_dict(), state)


@pytest.mark.parametrize(("name", "kwargs"), [("mcnn", {}), ("cmtl", {"level_width": 37.5}),
                                              ("csrnet", {"upsample": True}), ("smallfield", {"width": 8})])
def test_own_checkpoint_round_trip(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = build(name, **kwargs)
    ckpt = checkpoint_state(model) | {"epoch": 3, "optimizer": torch.optim.Adam(model.parameters()).state_dict()}
    torch.save(ckpt, tmp_path / "last.pt")
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["model"] == name and saved["model_kwargs"] == model.model_kwargs
    for again in (build(saved["model"], weights=tmp_path / "last.pt", **saved["model_kwargs"]),
                  build(saved["model"], weights=tmp_path / "last.pt")):  # the options read from the checkpoint
        assert same_state(again.net.state_dict(), model.net.state_dict())
        assert (again.stride, again.model_kwargs) == (model.stride, model.model_kwargs)
    fresh = build(name, **saved["model_kwargs"])
    load_state(fresh, saved, "last.pt")  # content already read, as the run-checkpoint code does
    assert same_state(fresh.net.state_dict(), model.net.state_dict())


def test_checkpoint_records_a_level_width_set_after_build():
    model = build("cmtl")
    model.level_width.fill_(123.0)
    assert checkpoint_state(model)["model_kwargs"] == {"level_width": 123.0}


def test_another_models_checkpoint_is_named(tmp_path):
    torch.save(checkpoint_state(build("mcnn")), tmp_path / "best.pt")
    with pytest.raises(WrongModel, match="is a mcnn checkpoint, not cmtl: use --model mcnn"):
        build("cmtl", weights=tmp_path / "best.pt")


def test_real_mcnn_file_given_as_another_model_names_mcnn(shared_dir):
    path = shared_dir / "weights" / "mcnn_shtechA_660.h5"
    for name, shown in (("csrnet", "CSRNet"), ("cmtl", "CMTL")):
        with pytest.raises(WrongModel) as err:
            build(name, weights=path)
        assert str(err.value) == f"{path} holds MCNN weights, not {shown}'s: use --model mcnn"
        assert err.value.holds == "mcnn"


@pytest.fixture(scope="module")
def every_model_file(tmp_path_factory):
    """A plain state-dict file of each registry model (random weights), as its original release names them."""
    folder = tmp_path_factory.mktemp("every_model")
    files = {}
    for name in MODEL_NAMES:
        state = build(name, seed=0).net.state_dict()
        if name == "danet":  # DA-Net's release names the network `fine`
            state = {"fine." + k.removeprefix("DA_Net."): v for k, v in state.items()}
        if name == "csrnet":  # CSRNet's release: under state_dict, with DataParallel's prefix
            state = {"state_dict": {"module." + k: v for k, v in state.items()}}
        torch.save(state, folder / f"{name}.pth")
        files[name] = folder / f"{name}.pth"
    return files


def test_every_architecture_is_recognised_in_one_short_line(every_model_file):
    for i, (holds, path) in enumerate(every_model_file.items()):
        asked = MODEL_NAMES[(i + 1) % len(MODEL_NAMES)]
        with pytest.raises(WrongModel) as err:
            build(asked, weights=path)
        assert str(err.value) == (f"{path} holds {DISPLAY_NAMES[holds]} weights, not {DISPLAY_NAMES[asked]}'s: "
                                  f"use --model {holds}")
        assert build(holds, weights=path).name == holds  # and it loads as what it holds


def test_a_file_of_no_known_model_lists_a_few_names(tmp_path):
    state = build("csrnet").net.state_dict()
    state = {**{k: v for k, v in state.items() if not k.startswith("backend.")},
             **{f"extra.{i}.weight": torch.zeros(2) for i in range(10)}}
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(ToolkitError) as err:
        build("csrnet", weights=tmp_path / "odd.pth")
    msg = str(err.value)
    assert not isinstance(err.value, WrongModel)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'odd.pth'} does not fit csrnet: missing backend.")
    assert "… and 9 more" in msg and "unexpected extra.0.weight (2)" in msg and "… and 7 more" in msg
    assert len(msg) < 400, len(msg)


def test_wrong_shape_is_reported(tmp_path):
    state = build("mcnn").net.state_dict()
    state["DME.fuse.0.conv.weight"] = torch.zeros(1, 29, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ToolkitError, match=r"wrong shape DME.fuse.0.conv.weight \(file \(1, 29, 1, 1\), "
                                           r"model \(1, 30, 1, 1\)\)"):
        build("mcnn", weights=tmp_path / "bad.pth")


@pytest.mark.parametrize("file, content, message", [
    ("broken.pth", b"PK\x03\x04 a zip archive cut short", "cannot read weights file"),
    ("broken.h5", b"\x89HDF\r\n\x1a\n not really" * 10, "cannot read weights file"),
    ("notes.pth", b"a text file\n", "is not a weight file: neither HDF5"),
    ("missing.pth", None, "not found")])
def test_unreadable_files(tmp_path, file, content, message):
    if content is not None:
        (tmp_path / file).write_bytes(content)
    with pytest.raises(ToolkitError, match=message) as err:
        build("mcnn", weights=tmp_path / file)
    assert "\n" not in str(err.value)


def test_truncated_real_file(shared_dir, tmp_path):
    data = (shared_dir / "weights" / "mcnn_shtechB_110.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(ToolkitError, match="cannot read"):
        build("mcnn", weights=tmp_path / "cut.h5")


class Payload:
    """Stands for a pickled object (e.g. a whole `nn.Module` saved with torch.save)."""


def test_pickled_objects_are_refused_without_advising_unsafe_loading(tmp_path, recwarn):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": build("mcnn").net.state_dict(), "args": Payload()}, path)
    with pytest.raises(ToolkitError) as err:
        build("mcnn", weights=path)
    msg = str(err.value)
    assert msg == (f"{path} holds pickled Python objects (test_weights.Payload), which are never unpickled (that can "
                   "run arbitrary code); save a plain state dict")
    assert "weights_only" not in msg and "\n" not in msg
    assert not [w for w in recwarn if "weights_only" in str(w.message) or "torch" in w.filename]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_an_error_naming_the_file(tmp_path, bad):
    state = build("mcnn").net.state_dict()
    state["DME.branch2.0.conv.weight"][0, 0, 0, 0] = bad
    save_h5(tmp_path / "diverged.h5", state)
    with pytest.raises(ToolkitError, match=r"diverged.h5 holds non-finite weights \(NaN or Inf\) in "
                                           r"DME.branch2.0.conv.weight:"):
        build("mcnn", weights=tmp_path / "diverged.h5")
    ckpt = checkpoint_state(build("mcnn")) | {"epoch": 0}  # own checkpoints too (a run that diverged)
    ckpt["state_dict"]["DME.fuse.0.conv.bias"].fill_(bad)
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(ToolkitError, match="last.pt holds non-finite weights"):
        build("mcnn", weights=tmp_path / "last.pt")


def test_danet_fine_prefix_hdf5_and_cmtl_training_buffer(tmp_path):
    torch.manual_seed(0)
    danet = build("danet")
    state = danet.net.state_dict()
    save_h5(tmp_path / "DA-Net_shtechA_80.h5", {"fine." + k.removeprefix("DA_Net."): v for k, v in state.items()})
    assert same_state(build("da-net", weights=tmp_path / "DA-Net_shtechA_80.h5").net.state_dict(), state)
    cmtl = build("cmtl")
    state = cmtl.net.state_dict()
    save_h5(tmp_path / "cmtl_shtechA_204.h5", state | {"loss_bce_fn.weight": torch.full((10,), 0.1)})
    loaded = build("cmtl")
    load_weights(loaded, tmp_path / "cmtl_shtechA_204.h5")
    assert same_state(loaded.net.state_dict(), state)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A stand-in for torchvision's vgg16-397923af.pth: random tensors in its `features.N` layout."""
    torch.manual_seed(0)
    widths = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
    state, cin, i = {}, 3, 0
    for v in widths:
        if v != "M":
            state[f"features.{i}.weight"], state[f"features.{i}.bias"] = torch.randn(v, cin, 3, 3), torch.randn(v)
            cin, i = v, i + 2
        else:
            i += 1
    state["classifier.0.weight"] = torch.randn(8, 8)  # the file also holds the classifier
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save(state, path)
    return path, state


def test_vgg_frontends(vgg_file, tmp_path):
    path, vgg = vgg_file
    vgg_convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    for name in ("csrnet", "can"):
        net = build(name, vgg_weights=path).net
        for i in vgg_convs[:10]:  # frontend keys share VGG's Sequential indices
            assert torch.equal(net.frontend[i].weight, vgg[f"features.{i}.weight"])
            assert torch.equal(net.frontend[i].bias, vgg[f"features.{i}.bias"])
    net = build("danet", vgg_weights=path).net.DA_Net
    assert torch.equal(net.conv1_1.weight, vgg["features.0.weight"][:, :1])
    assert torch.equal(net.conv2_1.weight, vgg["features.5.weight"])
    assert torch.equal(net.conv5_3.bias, vgg["features.28.bias"])
    torch.save(build("mcnn").net.state_dict(), tmp_path / "mcnn.pth")
    with pytest.raises(ToolkitError, match="not a torchvision VGG-16"):
        build("csrnet", vgg_weights=tmp_path / "mcnn.pth")

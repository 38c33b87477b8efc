"""Training recipes: ablation warm-up and kept-unit scaling, validation of the smoothed count."""
import math

import pytest
import torch

from utils.ablation import FILL, AblationSpec
from utils.errors import ToolkitError
from utils.recipes import AblationRecipe


class _Spy(torch.nn.Module):
    """Records its input; its loss is the mean input, so `AblationRecipe.loss` can be checked exactly."""

    def forward(self, x):
        self.seen = x
        return x.mean(dim=1, keepdim=True)

    def loss(self, x, target):
        return self(x).mean()


def test_warmup_is_clean_then_every_step_is_a_fresh_ablation():
    recipe = AblationRecipe(AblationSpec(30, reference_units=3 * 32 * 32), warmup_epochs=2,
                            generator=torch.Generator().manual_seed(0))
    spy, images = _Spy(), torch.rand(4, 3, 32, 32) + 1  # > 1, so no kept value equals the fill
    recipe.loss(spy, images, None, epoch=1)
    assert torch.equal(spy.seen, images)
    recipe.loss(spy, images, None, epoch=2)
    first = spy.seen.clone()
    assert ((first != FILL).sum(dim=(1, 2, 3)) == 30).all()
    assert torch.equal(first[first != FILL], images[first != FILL])
    recipe.loss(spy, images, None, epoch=2)
    assert not torch.equal(spy.seen, first)  # a new draw every step


def test_crops_keep_the_same_fraction_as_a_whole_image():
    spec = AblationSpec(45, reference_units=3 * 240 * 320)
    assert spec.crop_keep((3, 240, 320)) == 45
    assert spec.crop_keep((4, 3, 120, 160)) == round(45 / 4)
    assert spec.crop_keep((3, 8, 8)) == 1  # never zero
    assert AblationSpec(45, "pixel", reference_units=240 * 320).crop_keep((3, 120, 320)) == round(45 / 2)
    assert AblationSpec(45).crop_keep((3, 2, 3)) == 18  # no reference: at most the crop's units


def test_the_checkpoint_records_the_ablation_trained_with():
    spec = AblationSpec(30, "pixel", 0.5, 1000)
    assert AblationRecipe(spec).record() == {"ablation": spec.to_dict()}
    assert AblationSpec.from_checkpoint({"ablation": spec.to_dict()}) == spec
    assert AblationSpec.from_checkpoint({"args": {"keep": 7, "unit": "pixel"}}) == AblationSpec(7, "pixel")  # older
    assert AblationSpec.from_checkpoint({"args": {"lr": 0.1}}) is None


def test_bad_recipe_arguments():
    with pytest.raises(ToolkitError, match="validation samples"):
        AblationRecipe(AblationSpec(10), val_samples=0)
    with pytest.raises(ToolkitError, match="warm-up"):
        AblationRecipe(AblationSpec(10), warmup_epochs=-1)
    for bad, message in (({"keep": 0}, "positive"), ({"keep": 5, "unit": "voxel"}, "unknown ablation unit"),
                         ({"keep": 5, "fill": 7}, r"fill must lie in \[0, 1\]")):
        with pytest.raises(ToolkitError, match=message):
            AblationSpec.from_dict(bad)


def test_validation_reports_the_smoothed_count_only_after_warmup(tiny_mcnn, tiny_crowds):
    from datasets.crowd import CrowdDataset
    from models import build

    model = build("mcnn", tiny_mcnn)
    test_set = CrowdDataset.for_model(tiny_crowds / "test_data", model)
    recipe = AblationRecipe(AblationSpec(45), warmup_epochs=1, val_samples=3,
                            generator=torch.Generator().manual_seed(0))
    during, _ = recipe.validate(model, test_set, torch.device("cpu"), False, epoch=0)
    assert math.isnan(during["mae"]) and during["clean_mae"] >= 0
    after, rows = recipe.validate(model, test_set, torch.device("cpu"), False, epoch=1)
    assert after["clean_mae"] == pytest.approx(during["clean_mae"])
    assert after["mae"] == pytest.approx(sum(abs(r["smoothed"] - r["gt"]) for r in rows) / len(rows))


def test_kappa_schedule_corners():
    from utils.recipes import kappa

    assert [kappa(e, 800, "paper") for e in (0, 49)] == [1.0, 1.0]
    assert kappa(50, 800, "paper") == pytest.approx(1 - 0.5 / 350)
    assert kappa(224, 800, "paper") == pytest.approx(0.75)
    assert [kappa(e, 800, "paper") for e in (399, 400, 799)] == [0.5, 0.5, 0.5]
    assert kappa(5, 80, "paper") == pytest.approx(1 - 0.5 / 350)  # stretched: epoch 5 of 80 is epoch 50 of 800
    assert kappa(40, 80, "paper") == 0.5 and kappa(4, 80, "paper") == 1.0
    assert kappa(7, 10, "0.3") == 0.3
    for bad in ("1.5", "-0.1"):
        with pytest.raises(ToolkitError, match="kappa must lie in"):
            kappa(0, 10, bad)

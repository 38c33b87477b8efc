"""The shared training loop: which epochs may become best.pt, the learning-rate schedule, the weight average."""
import logging
import math

import pytest
import torch

from datasets.crowd import CrowdDataset
from models import build
from utils.errors import ToolkitError
from utils.training import Recipe, fit


class _NeverEligible(Recipe):
    """Validation that never yields a usable MAE, as adversarial training with kappa 1 throughout."""

    def validate(self, model, test_set, device, amp, epoch):
        metrics, rows = super().validate(model, test_set, device, amp, epoch)
        return {**metrics, "mae": math.nan}, rows


def test_no_best_checkpoint_when_no_epoch_is_eligible(tiny_crowds, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    model = build("mcnn")
    train, val = CrowdDataset.for_model(tiny_crowds / "train_data", model, crop=64).holdout(0.2, 0)
    summary = fit(model, train, val, CrowdDataset.for_model(tiny_crowds / "test_data", model, max_images=2), tmp_path,
                  epochs=1, batch_size=2, lr=1e-4, device=torch.device("cpu"), recipe=_NeverEligible())
    assert summary["best_epoch"] is None and summary["checkpoint"] == "last.pt"
    assert (tmp_path / "last.pt").is_file() and not (tmp_path / "best.pt").exists()
    assert "no epoch was eligible for best.pt" in caplog.text


class _Counted(Recipe):
    """Plain training that records which images every validation call scored."""

    def __init__(self):
        self.calls = []

    def validate(self, model, test_set, device, amp, epoch):
        self.calls.append(tuple(test_set.names))
        return super().validate(model, test_set, device, amp, epoch)


def test_the_validation_part_chooses_and_the_test_split_is_scored_once(tiny_crowds, tmp_path):
    import json

    from utils.io import load_checkpoint

    runs = {}
    for name, test_images in (("a", 2), ("b", 3)):  # two test sets: what is chosen must not depend on them
        model = build("mcnn", seed=3)
        train, val = CrowdDataset.for_model(tiny_crowds / "train_data", model, crop=64).holdout(0.3, 0)
        test = CrowdDataset.for_model(tiny_crowds / "test_data", model, max_images=test_images)
        recipe = _Counted()
        summary = fit(model, train, val, test, tmp_path / name, epochs=4, batch_size=2, lr=1e-3,
                      device=torch.device("cpu"), recipe=recipe)
        assert recipe.calls == [tuple(val.names)] * 4 + [tuple(test.names)]  # test: once, after the choice
        assert not set(val.images) & set(train.images) and not set(val.images) & set(test.images)
        saved = json.loads((tmp_path / name / "metrics.json").read_text())
        assert saved["validation"]["images"] == val.names and saved["test_images"] == test_images
        best = min(load_checkpoint(tmp_path / name / "last.pt")["history"], key=lambda h: h["mae"])
        assert saved["best_epoch"] == best["epoch"] and saved["validation"]["mae"] == best["mae"]
        runs[name] = (summary["best_epoch"], load_checkpoint(tmp_path / name / "best.pt")["state_dict"])
    assert runs["a"][0] == runs["b"][0]
    assert all(torch.equal(v, runs["b"][1][k]) for k, v in runs["a"][1].items())


def test_a_validation_share_that_leaves_nothing_to_train_on_is_refused(tiny_crowds):
    data = CrowdDataset.for_model(tiny_crowds / "train_data", build("mcnn"), max_images=1)
    with pytest.raises(ToolkitError, match="leaves none to train on"):
        data.holdout(0.1, 0)


def test_the_cosine_schedule_follows_a_longer_run_from_where_it_stands():
    from utils.training import cosine_schedule, restore_schedule

    def rates(epochs: int, steps: int, state: dict | None = None) -> tuple[list[float], dict]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        schedule = cosine_schedule(optimizer, epochs)
        if state:  # as fit resumes: the optimizer's own state holds the saved rate, the schedule replaces it
            optimizer.param_groups[0]["lr"] = -1.0
            restore_schedule(schedule, state)
        seen = []
        for _ in range(steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return seen, schedule.state_dict()

    whole, _ = rates(10, 10)
    assert whole == [0.5 * (1 + math.cos(math.pi * e / 10)) for e in range(10)]  # the closed form
    first, state = rates(10, 6)
    extended, _ = rates(20, 4, state)  # resumed with --epochs 20: the 20-epoch curve from epoch 6 on
    assert first == whole[:6]
    assert extended == [0.5 * (1 + math.cos(math.pi * e / 20)) for e in range(6, 10)]


def test_the_weight_average_follows_its_definition():
    from utils.training import WeightAverage

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    snapshots = [{k: v.clone() for k, v in net.state_dict().items()}]
    average, decay = WeightAverage(net, 0.9), 0.9
    for _ in range(2):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(4, 1, 5, 5))  # training mode: the batch-norm statistics and batch count move too
        average.update(net)
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
    w0, w1, w2 = snapshots
    for key, value in average.model.state_dict().items():
        if value.is_floating_point():
            expected = decay ** 2 * w0[key] + decay * (1 - decay) * w1[key] + (1 - decay) * w2[key]
            assert torch.allclose(value, expected, atol=1e-6), key
        else:
            assert torch.equal(value, w2[key]), key  # num_batches_tracked: copied
    assert not any(p.requires_grad for p in average.model.parameters())


def test_with_a_weight_average_the_average_is_validated_kept_and_resumed(tiny_crowds, tmp_path):
    from utils.engine import evaluate
    from utils.io import load_checkpoint
    from utils.training import WeightAverage

    class StopAtThirdEpoch(Recipe):
        def validate(self, model, test_set, device, amp, epoch):
            if epoch == 2:  # before epoch 3 is saved: last.pt holds epoch 2
                raise KeyboardInterrupt
            return super().validate(model, test_set, device, amp, epoch)

    def run(out, recipe=None, resume=False):
        model = build("smallfield", seed=1, width=4)
        train, val = CrowdDataset.for_model(tiny_crowds / "train_data", model, crop=64).holdout(0.3, 0)
        fit(model, train, val, None, out, epochs=3, batch_size=2, lr=1e-3, device=torch.device("cpu"),
            resume=resume, recipe=recipe, ema=0.8)
        return val

    val = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", StopAtThirdEpoch())
    run(tmp_path / "resumed", resume=True)
    whole, resumed = (load_checkpoint(tmp_path / name / "last.pt") for name in ("whole", "resumed"))
    for key in ("state_dict", "training_weights"):  # the average and the weights trained both go on exactly
        assert all(torch.equal(v, resumed[key][k]) for k, v in whole[key].items()), key
    trained = whole["training_weights"]  # the whole model's state: the net's under "net."
    assert any(not torch.equal(v, trained[f"net.{k}"]) for k, v in whole["state_dict"].items())
    model = build("smallfield", tmp_path / "whole" / "last.pt")
    metrics, _, _ = evaluate(model, val, torch.device("cpu"))
    assert metrics["mae"] == whole["history"][-1]["mae"]  # the validated model is the one saved
    with pytest.raises(ToolkitError, match="decay"):
        WeightAverage(model, 1.0)

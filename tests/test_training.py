"""The shared training loop: which epochs may become best.pt, the learning-rate schedule."""
import logging
import math

import torch

from datasets.crowd import CrowdDataset
from models import build
from utils.training import Recipe, fit


class _NeverEligible(Recipe):
    """Validation that never yields a usable MAE, as adversarial training with kappa 1 throughout."""

    def validate(self, model, test_set, device, amp, epoch):
        metrics, rows = super().validate(model, test_set, device, amp, epoch)
        return {**metrics, "mae": math.nan}, rows


def test_no_best_checkpoint_when_no_epoch_is_eligible(tiny_crowds, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    model = build("mcnn")
    summary = fit(model, CrowdDataset.for_model(tiny_crowds / "train_data", model, crop=64),
                  CrowdDataset.for_model(tiny_crowds / "test_data", model, max_images=2), tmp_path, epochs=1,
                  batch_size=2, lr=1e-4, device=torch.device("cpu"), recipe=_NeverEligible())
    assert summary["best_epoch"] is None and summary["checkpoint"] == "last.pt"
    assert (tmp_path / "last.pt").is_file() and not (tmp_path / "best.pt").exists()
    assert "no epoch was eligible for best.pt" in caplog.text


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

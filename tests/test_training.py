"""The shared training loop: which epochs may become best.pt."""
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


def test_no_best_checkpoint_when_no_epoch_is_eligible(tiny_crowds, tmp_path, capsys):
    model = build("mcnn")
    summary = fit(model, CrowdDataset.for_model(tiny_crowds / "train_data", model, crop=64),
                  CrowdDataset.for_model(tiny_crowds / "test_data", model, max_images=2), tmp_path, epochs=1,
                  batch_size=2, lr=1e-4, device=torch.device("cpu"), recipe=_NeverEligible())
    assert summary["best"] is None and (tmp_path / "last.pt").is_file() and not (tmp_path / "best.pt").exists()
    assert "no epoch was eligible for best.pt" in capsys.readouterr().out

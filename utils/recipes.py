"""Training recipes beyond plain training (see `utils.training.Recipe`): randomized-ablation ("certified")
training and adversarial training with a co-evolving universal patch."""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from datasets.crowd import CrowdDataset
from utils.ablation import FILL, ablate, scaled_keep, units_per_image
from utils.attack import APAM, APAMConfig, attack_metrics
from utils.certify import ablated_counts
from utils.errors import ToolkitError
from utils.metrics import summarize
from utils.patch import apply_patch, sample_centers
from utils.runtime import autocast
from utils.training import Recipe


class AblationRecipe(Recipe):
    """Clean warm-up epochs, then every step on a fresh ablation of the batch
    (the paper: 20 clean epochs, then 780 ablated).

    A crop keeps the same fraction of its units as `keep` is of a whole image of `reference_units` (the mean
    test image), so the density of kept units, and hence the scale of each one's contribution to the count,
    is the one the certified model meets on whole images. Validation: the clean count, one ablation per image,
    and the smoothed count (median of `val_samples` ablations), which picks best.pt; only the clean count during
    the warm-up.
    """

    def __init__(self, keep: int, unit: str = "element", fill: float = FILL, warmup_epochs: int = 0,
                 val_samples: int = 16, reference_units: int | None = None, batch_size: int = 64,
                 generator: torch.Generator | None = None):
        if val_samples < 1:
            raise ToolkitError(f"the number of validation samples must be at least 1, got {val_samples}")
        if warmup_epochs < 0:
            raise ToolkitError(f"warm-up epochs must be at least 0, got {warmup_epochs}")
        self.keep, self.unit, self.fill, self.warmup_epochs = keep, unit, fill, warmup_epochs
        self.val_samples, self.reference_units, self.batch_size = val_samples, reference_units, batch_size
        self.generator = generator

    def state_dict(self) -> dict:  # so that a resumed run draws new ablations, not the first epochs' again
        return {"generator": self.generator.get_state()} if self.generator is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])

    def keep_for(self, shape: tuple[int, ...]) -> int:
        return scaled_keep(self.keep, shape, self.reference_units, self.unit)

    def loss(self, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        if epoch >= self.warmup_epochs:
            images = ablate(images, self.keep_for(images.shape), self.unit, self.fill, self.generator)
        return model.loss(images, targets)

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, test_set: CrowdDataset, device: torch.device, amp: bool,
                 epoch: int) -> tuple[dict, list[dict]]:
        if epoch < self.warmup_epochs:  # the smoothed count of a clean-trained model says little: save the time
            metrics, rows = super().validate(model, test_set, device, amp, epoch)
            return {"mae": math.nan, "mse": math.nan, "ablated_mae": math.nan, "ablated_mse": math.nan,
                    "clean_mae": metrics["mae"]}, rows
        model.eval()
        rows = []
        for i in tqdm(range(len(test_set)), desc="validate", leave=False, dynamic_ncols=True):
            image, _, count = test_set[i]
            image = image.to(device)
            with autocast(device, amp):
                clean = float(model(image[None]).float().sum())
                counts = ablated_counts(model, image, min(self.keep, units_per_image(image.shape, self.unit)),
                                        self.val_samples, self.unit, self.fill, self.batch_size, self.generator)
            rows.append({"image": test_set.names[i], "gt": count, "pred": clean, "ablated": float(counts[0]),
                         "smoothed": float(np.median(counts.cpu().numpy()))})
        gt = [r["gt"] for r in rows]
        smoothed, ablated, clean = (summarize([r[key] for r in rows], gt) for key in ("smoothed", "ablated", "pred"))
        return {"mae": smoothed["mae"], "mse": smoothed["mse"], "ablated_mae": ablated["mae"],
                "ablated_mse": ablated["mse"], "clean_mae": clean["mae"]}, rows


def kappa(epoch: int, epochs: int, spec: str | float) -> float:
    """Weight κ of the clean loss at `epoch` (0-based): a constant, or `paper` (the paper's code): 1 for epochs 0–49,
    then linear down to 0.5 at epoch 399, then 0.5, with the 800-epoch axis stretched onto `epochs`."""
    if spec != "paper":
        try:
            value = float(spec)
        except ValueError:
            value = math.nan
        if not 0 <= value <= 1:
            raise ToolkitError(f"kappa must lie in [0, 1] or be 'paper', got {spec}")
        return value
    t = epoch * 800 / epochs
    return min(1.0, max(0.5, 1 - 0.5 * (t - 49) / 350))


class AdversarialRecipe(Recipe):
    """Adversarial training with a universal patch that co-evolves with the model (the paper's ADT): each step runs
    `attack_steps` APAM updates of the carried patch on the batch, then descends (1 − κ)·loss(patched) + κ·loss(clean).

    Validation: clean MAE / RMSE, and MAE / RMSE under a fresh APAM patch with the same budget every epoch
    (`val_attack`: `attack_metrics` arguments from `attack_set` on); the attacked MAE of the epochs with κ < 1
    picks best.pt.
    """

    def __init__(self, patch: torch.Tensor, mask: torch.Tensor, config: APAMConfig, attack_steps: int,
                 kappa_spec: str | float, epochs: int, val_attack: dict, generator: torch.Generator | None = None,
                 amp: bool = True):
        if attack_steps < 0:
            raise ToolkitError(f"the number of attack steps must be at least 0, got {attack_steps}")
        kappa(0, epochs, kappa_spec)  # fail early on a bad κ
        self.config, self.attack_steps, self.kappa_spec, self.epochs = config, attack_steps, kappa_spec, epochs
        self.val_attack, self.generator = val_attack, generator
        self.attack = APAM(None, patch, mask, config, generator, amp)

    def loss(self, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        k = kappa(epoch, self.epochs, self.kappa_spec)
        self.attack.model = model  # the network stays in train mode during the attack, as in the paper's code
        target = self.attack.batch_target(images, targets) if self.attack_steps else None
        for _ in range(self.attack_steps):
            self.attack.step(images, target)
        n, _, h, w = images.shape
        centers = sample_centers(n, h, w, self.attack.patch.shape[-1], self.config.placement, self.generator)
        patched, _ = apply_patch(images, self.attack.patch, self.attack.mask, centers, self.config.transform,
                                 self.generator)
        adversarial = model.loss(patched, targets) if k < 1 else 0.0
        return (1 - k) * adversarial + k * model.loss(images, targets)

    def validate(self, model: torch.nn.Module, test_set: CrowdDataset, device: torch.device, amp: bool,
                 epoch: int) -> tuple[dict, list[dict]]:
        model.eval()
        metrics, rows = attack_metrics(model, test_set=test_set, side=self.attack.patch.shape[-1],
                                       mask=self.attack.mask, device=device, amp=amp, **self.val_attack)
        k = kappa(epoch, self.epochs, self.kappa_spec)
        attacked = metrics["attacked"]
        # best.pt is picked among the epochs that trained on patches (κ < 1), so it is never a clean-only model
        chosen = attacked if k < 1 else {"mae": math.nan, "mse": math.nan}
        return {"mae": chosen["mae"], "mse": chosen["mse"], "attacked_mae": attacked["mae"],
                "attacked_mse": attacked["mse"], "clean_mae": metrics["clean"]["mae"],
                "clean_mse": metrics["clean"]["mse"], "kappa": k}, [{**r, "pred": r["clean"]} for r in rows]

    def state_dict(self) -> dict:
        state = {"patch": self.attack.patch.cpu(), "velocity": self.attack.velocity.cpu()}
        return state | ({"generator": self.generator.get_state()} if self.generator is not None else {})

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.attack.patch = state["patch"].to(self.attack.patch.device)
            self.attack.velocity = state["velocity"].to(self.attack.velocity.device)
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])

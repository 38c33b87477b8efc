"""Training recipes beyond plain training (see `utils.training.Recipe`): randomized-ablation ("certified")
training and adversarial training with a co-evolving universal patch."""
from __future__ import annotations

import math

import numpy as np
import torch

from datasets.crowd import CrowdDataset
from utils import distributed
from utils.ablation import AblationSpec, mean_units
from utils.attack import APAM, APAMConfig, attack_metrics
from utils.errors import ToolkitError
from utils.metrics import summarize
from utils.patch import PatchSpec, random_patch
from utils.runtime import autocast, progress, rank_seed
from utils.training import Recipe

# The training scripts' defaults: on the synthetic crowds, each run fits within about 10 minutes on 2 CPU cores
# (ablated steps learn slowly, so the warm-up is short; adversarial training fine-tunes the cached victim)
ABLATION_DEFAULTS = {"epochs": 12, "batch_size": 4, "crop": 128, "lr": 1e-3, "warmup_epochs": 3, "val_samples": 5}
ADVERSARIAL_DEFAULTS = {"epochs": 6, "batch_size": 4, "crop": 128, "lr": 1e-4, "attack_steps": 5, "kappa": "paper",
                        "attack_lr": 1e-3, "val_epochs": 6, "val_restarts": 2}


class AblationRecipe(Recipe):
    """Clean warm-up epochs, then every step on a fresh ablation of the batch
    (the paper: 20 clean epochs, then 780 ablated).

    The ablations follow `spec` (a crop keeps the share of its units that k is of the spec's reference image, so
    the density of kept units, and hence the scale of each one's contribution to the count, is the one the
    certified model meets on whole images); the spec goes into every checkpoint (`ablation`), so smoothing and
    certification use what the model was trained with. Validation: the clean count, one ablation per image, and
    the smoothed count (median of `val_samples` ablations), which picks best.pt; only the clean count during the
    warm-up.
    """

    def __init__(self, spec: AblationSpec, warmup_epochs: int = 0, val_samples: int = 16, batch_size: int = 64,
                 generator: torch.Generator | None = None):
        if val_samples < 1:
            raise ToolkitError(f"the number of validation samples must be at least 1, got {val_samples}")
        if warmup_epochs < 0:
            raise ToolkitError(f"warm-up epochs must be at least 0, got {warmup_epochs}")
        self.spec, self.warmup_epochs, self.val_samples, self.batch_size = spec, warmup_epochs, val_samples, batch_size
        self.generator = generator

    def record(self) -> dict:
        return {"ablation": self.spec.to_dict()}

    def state_dict(self) -> dict:  # so that a resumed run draws new ablations, not the first epochs' again
        return {"generator": self.generator.get_state()} if self.generator is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])
            if distributed.world_size() > 1:  # the checkpoint holds rank 0's stream: each rank branches off it
                self.generator.manual_seed(rank_seed(_draw_seed(self.generator)))

    def loss(self, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        if epoch >= self.warmup_epochs:
            images = self.spec.ablate(images, self.generator, crop=True)
        return model.loss(images, targets)

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, test_set: CrowdDataset, device: torch.device, amp: bool,
                 epoch: int) -> tuple[dict, list[dict]]:
        if epoch < self.warmup_epochs:  # the smoothed count of a clean-trained model says little: save the time
            metrics, rows = super().validate(model, test_set, device, amp, epoch)
            return {"mae": math.nan, "rmse": math.nan, "ablated_mae": math.nan, "ablated_rmse": math.nan,
                    "clean_mae": metrics["mae"], "note": "warm-up epoch: the smoothed count is not validated"}, rows
        model.eval()
        rows = []
        for i in progress(range(len(test_set)), "validate"):
            image, _, count = test_set[i]
            image = image.to(device)
            with autocast(device, amp):
                clean = float(model(image[None]).float().sum())
                counts = self.spec.counts(model, image, self.val_samples, self.batch_size, self.generator)
            rows.append({"image": test_set.names[i], "gt": count, "pred": clean, "ablated": float(counts[0]),
                         "smoothed": float(np.median(counts.cpu().numpy()))})
        gt = [r["gt"] for r in rows]
        smoothed, ablated, clean = (summarize([r[key] for r in rows], gt) for key in ("smoothed", "ablated", "pred"))
        return {"mae": smoothed["mae"], "rmse": smoothed["rmse"], "ablated_mae": ablated["mae"],
                "ablated_rmse": ablated["rmse"], "clean_mae": clean["mae"], "note": ""}, rows


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

    The patch is applied as `spec` says, which goes into every checkpoint (`patch`). Validation: clean MAE / RMSE,
    and MAE / RMSE under fresh APAM patches of the same spec with a fixed budget every epoch (`attack_metrics`:
    `val_restarts` patches, each `val_epochs` passes over `attack_set`, drawn from `seed`); the attacked MAE of the
    epochs with κ < 1 picks best.pt.
    """

    def __init__(self, patch: torch.Tensor, spec: PatchSpec, config: APAMConfig, attack_steps: int,
                 kappa_spec: str | float, epochs: int, attack_set: CrowdDataset, val_epochs: int = 6,
                 val_restarts: int = 2, seed: int = 0, generator: torch.Generator | None = None, amp: bool = True):
        if attack_steps < 0:
            raise ToolkitError(f"the number of attack steps must be at least 0, got {attack_steps}")
        kappa(0, epochs, kappa_spec)  # fail early on a bad κ
        spec.check_fits(attack_set.smallest_side(), "the smallest validation crop or image")
        self.spec, self.config, self.attack_steps, self.kappa_spec, self.epochs = (spec, config, attack_steps,
                                                                                   kappa_spec, epochs)
        self.val_attack = {"attack_set": attack_set, "epochs": val_epochs, "restarts": val_restarts, "seed": seed}
        self.generator = generator
        self.attack = APAM(None, patch, spec, config, generator, amp)

    def record(self) -> dict:
        return {"patch": self.spec.to_dict()}

    def loss(self, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        k = kappa(epoch, self.epochs, self.kappa_spec)
        self.attack.model = model  # the network stays in train mode during the attack, as in the paper's code
        target = self.attack.batch_target(images, targets) if self.attack_steps else None
        for _ in range(self.attack_steps):
            self.attack.step(images, target)
        patched, _ = self.spec.apply(images, self.attack.patch, self.generator)
        adversarial = model.loss(patched, targets) if k < 1 else 0.0
        return (1 - k) * adversarial + k * model.loss(images, targets)

    def validate(self, model: torch.nn.Module, test_set: CrowdDataset, device: torch.device, amp: bool,
                 epoch: int) -> tuple[dict, list[dict]]:
        model.eval()
        metrics, rows = attack_metrics(model, test_set=test_set, spec=self.spec, device=device, amp=amp,
                                       **self.val_attack)
        k = kappa(epoch, self.epochs, self.kappa_spec)
        attacked = metrics["attacked"]
        # best.pt is picked among the epochs that trained on patches (κ < 1), so it is never a clean-only model
        chosen = attacked if k < 1 else {"mae": math.nan, "rmse": math.nan}
        return {"mae": chosen["mae"], "rmse": chosen["rmse"], "attacked_mae": attacked["mae"],
                "attacked_rmse": attacked["rmse"], "clean_mae": metrics["clean"]["mae"],
                "clean_rmse": metrics["clean"]["rmse"], "kappa": k,
                "note": "" if k < 1 else "κ = 1: a clean-only epoch, not eligible for best.pt (mae is null)"}, \
            [{**r, "pred": r["clean"]} for r in rows]

    def replicated(self) -> list[torch.Tensor]:  # the co-evolving patch: its gradient is averaged across ranks
        return [self.attack.patch, self.attack.velocity]

    def state_dict(self) -> dict:
        state = {"patch": self.attack.patch.cpu(), "velocity": self.attack.velocity.cpu()}
        return state | ({"generator": self.generator.get_state()} if self.generator is not None else {})

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.attack.patch = state["patch"].to(self.attack.patch.device)
            self.attack.velocity = state["velocity"].to(self.attack.velocity.device)
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])


def _draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(2**62, (1,), generator=generator, device=generator.device))


def ablation_recipe(test_set: CrowdDataset, keep: int, unit: str, fill: float, warmup_epochs: int, val_samples: int,
                    seed: int, device: torch.device) -> AblationRecipe:
    """Ablation training as the scripts run it: k refers to a whole image of the mean test size (a crop keeps the
    same share of its units); ablations drawn on the device from `seed` (under torchrun, from (`seed`, rank): each
    rank ablates its own batches differently)."""
    spec = AblationSpec(keep, unit, fill, mean_units(test_set.sizes(), unit))
    return AblationRecipe(spec, warmup_epochs, val_samples,
                          generator=torch.Generator(device=device).manual_seed(rank_seed(seed)))


def adversarial_recipe(probe_set: CrowdDataset, spec: PatchSpec, config: APAMConfig, *,
                       crop: int, attack_steps: int, kappa_spec: str | float, epochs: int, val_epochs: int,
                       val_restarts: int, seed: int, device: torch.device, amp: bool = True) -> AdversarialRecipe:
    """Adversarial training as the scripts run it: the patch starts as noise drawn from `seed`; the probes that
    validate each epoch (and score the kept checkpoint on the test split) are fitted on `crop`-pixel crops of
    `probe_set`'s images (the validation part: cheap, every epoch, never the test split)."""
    gen = torch.Generator().manual_seed(seed)
    attack_set = probe_set.subset(range(len(probe_set)), crop=crop, erase=0.0)
    return AdversarialRecipe(random_patch(spec.side, gen).to(device), spec, config, attack_steps, kappa_spec, epochs,
                             attack_set, val_epochs, val_restarts, seed, gen, amp)

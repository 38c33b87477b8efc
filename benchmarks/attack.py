"""Cost of one APAM step (transforms, forward, backward, update) against the bare forward and backward of the same
model on the same batch (8 crops of 256×256), for MCNN and CSRNet; prints JSON.

    python benchmarks/attack.py [--device cuda] [--repeats 5]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models import build  # noqa: E402
from utils.attack import APAM, APAMConfig  # noqa: E402
from utils.patch import PatchSpec, random_patch  # noqa: E402
from utils.runtime import pick_device, prepare_model  # noqa: E402
from utils.timing import best_seconds  # noqa: E402


def bench(name: str, device: torch.device, batch: int, side: int, patch: int, repeats: int, amp: bool) -> dict:
    torch.manual_seed(0)
    model = prepare_model(build(name).requires_grad_(False), device).eval()
    images = torch.rand(batch, 3, side, side, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    attack = APAM(model, random_patch(patch).to(device), PatchSpec(patch), APAMConfig(), amp=amp)
    target = attack.batch_target(images, None)

    def bare() -> None:
        x = images.detach().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda"):
            loss = torch.nn.functional.mse_loss(model(x).float(), target, reduction="sum") / batch
        torch.autograd.grad(loss, x)

    t_bare = best_seconds(bare, repeats, device=device)
    t_step = best_seconds(lambda: attack.step(images, target), repeats, device=device)
    return {"bare_forward_backward_s": round(t_bare, 4), "apam_step_s": round(t_step, 4),
            "ratio": round(t_step / t_bare, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=["mcnn", "csrnet"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--patch", type=int, default=81)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    args = parser.parse_args()
    device = pick_device(args.device)
    result = {"device": str(device), "batch": args.batch, "side": args.side, "patch": args.patch, "amp": args.amp}
    for name in args.models:
        result[name] = bench(name, device, args.batch, args.side, args.patch, args.repeats, args.amp)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

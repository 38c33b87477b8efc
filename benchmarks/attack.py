"""Cost of one APAM step (transforms, forward, backward, update) against the bare forward and backward of the same
model on the same batch (8 crops of 256×256), for MCNN and CSRNet; and the seconds an APAM epoch over 100 whole
images of 768×1024 takes (from the step time at --epoch-batch images per step), in fp32 and, on CUDA, under
autocast. Prints JSON.

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
from utils.runtime import AMP_DTYPES, autocast, configure, pick_device, prepare_model  # noqa: E402
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
        with autocast(device, amp):  # the dtype APAM's own forward uses
            loss = torch.nn.functional.mse_loss(model(x).float(), target, reduction="sum") / batch
        torch.autograd.grad(loss, x)

    t_bare = best_seconds(bare, repeats, device=device)
    t_step = best_seconds(lambda: attack.step(images, target), repeats, device=device)
    return {"bare_forward_backward_s": round(t_bare, 4), "apam_step_s": round(t_step, 4),
            "ratio": round(t_step / t_bare, 3)}


def epoch_seconds(name: str, device: torch.device, batch: int, patch: int, repeats: int, amp: bool,
                  images: int = 100) -> float:
    """Seconds of one APAM epoch over `images` images of 768×1024, `batch` per step (timed steps, scaled)."""
    torch.manual_seed(0)
    model = prepare_model(build(name).requires_grad_(False), device).eval()
    x = torch.rand(batch, 3, 768, 1024, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    attack = APAM(model, random_patch(patch).to(device), PatchSpec(patch), APAMConfig(), amp=amp)
    target = attack.batch_target(x, None)
    step = best_seconds(lambda: attack.step(x, target), repeats, warmup=int(device.type == "cuda"), device=device)
    return round(step * images / batch, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=["mcnn", "csrnet"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--patch", type=int, default=81)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument("--epoch-batch", type=int, help="images per step of the 768×1024 epoch; default 1 on the CPU, "
                                                         "8 on CUDA")
    parser.add_argument("--amp-dtype", default="bfloat16", choices=AMP_DTYPES, help="autocast dtype of the epoch")
    args = parser.parse_args()
    device = pick_device(args.device)
    configure(args.amp_dtype)
    result = {"device": str(device), "batch": args.batch, "side": args.side, "patch": args.patch, "amp": args.amp}
    epoch_batch = args.epoch_batch or (8 if device.type == "cuda" else 1)
    for name in args.models:
        result[name] = bench(name, device, args.batch, args.side, args.patch, args.repeats, args.amp)
        epoch = {"fp32": epoch_seconds(name, device, epoch_batch, args.patch, 1, False)}
        if device.type == "cuda":  # autocast is off on the CPU
            epoch[args.amp_dtype] = epoch_seconds(name, device, epoch_batch, args.patch, args.repeats, True)
            epoch["speedup"] = round(epoch["fp32"] / epoch[args.amp_dtype], 2)
        result[name]["apam_epoch_100_images_768x1024_s"] = {"batch": epoch_batch, **epoch}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Per model at 768×1024 (a ShanghaiTech Part A-sized image): training throughput (images/s, an Adam step on
`model.loss`) and certification throughput (forward passes/s on a batch of ablated copies of one image), in fp32
with the tensors as PyTorch makes them (contiguous), in fp32 channels-last (what `prepare_model` does on every device)
and under autocast in --amp-dtype with channels-last (on the CPU bfloat16 only, the scripts' `--amp-dtype
bfloat16`), each also as a speed-up over the first. Prints JSON.

    python benchmarks/throughput.py [--device cuda] [--models mcnn csrnet]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models import MODEL_NAMES, build  # noqa: E402
from utils.ablation import ablate  # noqa: E402
from utils.runtime import pick_device  # noqa: E402
from utils.timing import best_seconds  # noqa: E402


def measure(name: str, device: torch.device, height: int, width: int, train_batch: int, certify_batch: int,
            repeats: int, dtype: torch.dtype | None, channels_last: bool) -> dict:
    """(train images/s, certification forward passes/s) of `name`, fp32 (`dtype` None) or under autocast to `dtype`,
    contiguous or channels-last."""
    torch.manual_seed(0)
    model = build(name).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    images = torch.rand(train_batch, 3, height, width, device=device).to(memory_format=fmt)
    targets = torch.rand(train_batch, 1, height // model.stride, width // model.stride, device=device) * 1e-3
    ablated = ablate(images[:1].expand(certify_batch, -1, -1, -1), 45).to(memory_format=fmt)

    def cast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def step() -> None:
        model.train()
        with cast():
            loss = model.loss(images, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.float().backward()
        optimizer.step()

    @torch.no_grad()
    def certify() -> None:
        model.eval()
        with cast():
            model(ablated).float().sum(dim=(1, 2, 3)).cpu()

    warmup = int(device.type == "cuda")  # the CPU has no kernels to pick or compile: one timed call is enough there
    return {"train_images_per_s": train_batch / best_seconds(step, repeats, warmup, device),
            "certify_forward_passes_per_s": certify_batch / best_seconds(certify, repeats, warmup, device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--train-batch", type=int, help="default: 1 on the CPU, 4 on CUDA")
    parser.add_argument("--certify-batch", type=int, help="default: 2 on the CPU, 32 on CUDA")
    parser.add_argument("--repeats", type=int, help="default: 1 on the CPU, 5 on CUDA")
    parser.add_argument("--amp-dtype", default="bfloat16", choices=["float16", "bfloat16"])
    args = parser.parse_args()
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    train_batch = args.train_batch or (4 if cuda else 1)
    certify_batch = args.certify_batch or (32 if cuda else 2)
    repeats = args.repeats or (5 if cuda else 1)
    result = {"benchmark": "throughput", "device": str(device), "image": [args.height, args.width],
              "train_batch": train_batch, "certify_batch": certify_batch, "models": {}}
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(device)
    for name in args.models:
        settings = {"fp32": (None, False), "fp32_channels_last": (None, True)}
        if cuda or args.amp_dtype == "bfloat16":  # float16 autocast has no fast CPU kernels
            settings[args.amp_dtype + "_channels_last"] = (getattr(torch, args.amp_dtype), True)
        row = {key: measure(name, device, args.height, args.width, train_batch, certify_batch, repeats, *setting)
               for key, setting in settings.items()}
        row["speedup"] = {key: {k: row[key][k] / row["fp32"][k] for k in row[key]} for key in settings
                          if key != "fp32"}
        result["models"][name] = row
        print(f"{name}: {row}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

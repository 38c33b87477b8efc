"""Cost of a 3×3 placement sweep (`patched_counts`, placement "sweep") evaluated where the patch reaches
(`utils.local_eval`) against whole passes, after the clean count `evaluate_patch` makes first: for a plain MCNN
(`LocalCounter`) and for randomized ablation's smoothed counter (`LocalSmoothedCounter`, N ablations keeping k
elements). Both give the same counts (tests/test_local_eval.py); the ratio is the speed-up. Prints JSON.

    python benchmarks/sweep.py [--device cuda] [--patch 40]
"""
import argparse
import json
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models import build  # noqa: E402
from utils.ablation import AblationSpec  # noqa: E402
from utils.attack import patched_counts  # noqa: E402
from utils.certify import AblationCertifier  # noqa: E402
from utils.local_eval import LocalCounter  # noqa: E402
from utils.patch import PatchSpec, random_patch  # noqa: E402
from utils.runtime import pick_device, prepare_model  # noqa: E402
from utils.timing import best_seconds  # noqa: E402


def sweep_seconds(counter, images: torch.Tensor, spec: PatchSpec, patch: torch.Tensor, repeats: int) -> float:
    """Seconds of the clean count and the sweep after it, as `evaluate_patch` makes them."""
    gt = torch.zeros(len(images), device=images.device)

    def run() -> None:
        with torch.no_grad():
            counter(images)
            patched_counts(counter, images, gt, patch, spec, "sweep", torch.Generator().manual_seed(0), amp=False)

    return best_seconds(run, repeats, warmup=0, device=images.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--patch", type=int, default=40)
    parser.add_argument("--samples", type=int, default=4, help="ablations per image of the smoothed counter")
    parser.add_argument("--keep", type=int, default=45)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = prepare_model(build("mcnn"), device).eval()
    images = torch.rand(1, 3, args.height, args.width, device=device)
    spec, patch = PatchSpec(args.patch), random_patch(args.patch).to(device)
    result = {"device": str(device), "model": "mcnn", "image": [3, args.height, args.width], "patch": args.patch}
    whole = sweep_seconds(model, images, spec, patch, args.repeats)
    local = sweep_seconds(LocalCounter(model), images, spec, patch, args.repeats)
    result["plain"] = {"whole_s": round(whole, 3), "local_s": round(local, 3), "speedup": round(whole / local, 2)}
    certifier = AblationCertifier(AblationSpec(args.keep), args.samples,
                                  generator=torch.Generator(device=device).manual_seed(0))
    whole = sweep_seconds(partial(certifier.density, model), images, spec, patch, args.repeats)
    local = sweep_seconds(certifier.local_counter(model), images, spec, patch, args.repeats)
    result["smoothed"] = {"samples": args.samples, "keep": args.keep, "whole_s": round(whole, 3),
                          "local_s": round(local, 3), "speedup": round(whole / local, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

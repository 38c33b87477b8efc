"""Cost of certifying, against the bare forward passes it needs, for patch sides 20 40 81 163. Prints JSON.

- ablation: one image's N ablated counts (`AblationSpec.counts`), moved to the host, and the certified intervals,
  against the bare batched forward passes on the same N ablated inputs generated beforehand (target: ≤ 1.10);
- rf-clip and rf-mask: a batch of images' certified counts and intervals (one forward pass, box filters, the rows
  on the host), against the bare forward pass and count of the same images (target: ≤ 1.2).

    python benchmarks/certify.py [--device cuda]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models import build  # noqa: E402
from models.receptive_field import receptive_field  # noqa: E402
from utils.ablation import AblationSpec, ablate, units_per_image  # noqa: E402
from utils.certify import certified_interval, delta, patch_units  # noqa: E402
from utils.patch import PatchSpec  # noqa: E402
from utils.rf_certify import Calibration, RFClipCertifier, RFMaskCertifier  # noqa: E402
from utils.runtime import autocast, pick_device, prepare_model  # noqa: E402
from utils.timing import best_seconds  # noqa: E402

SIDES = (20, 40, 81, 163)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="mcnn")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--keep", type=int, default=45)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--images", type=int, default=4, help="images per forward pass of the rf certificates")
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = prepare_model(build(args.model), device).eval()
    image = torch.rand(3, args.height, args.width, device=device)
    d = units_per_image(image.shape, "element")
    generator = torch.Generator(device=device).manual_seed(0)
    spec = AblationSpec(args.keep)

    def certify() -> None:
        samples = spec.counts(model, image, args.samples, args.batch_size, generator).cpu().numpy()
        for s in SIDES:
            certified_interval(samples, delta(d, patch_units(s, "element"), args.keep), 0.05)

    sizes = [min(args.batch_size, args.samples - i) for i in range(0, args.samples, args.batch_size)]
    batches = [ablate(image.expand(n, *image.shape), args.keep, generator=generator) for n in sizes]

    def bare() -> None:
        for b in batches:
            model(b).sum(dim=(1, 2, 3))

    t_bare = t_certify = float("inf")
    with torch.no_grad(), autocast(device, args.amp):
        bare()  # warm-up
        certify()
        for _ in range(args.repeats):  # interleaved, so that a change of load elsewhere hits both alike
            t_bare = min(t_bare, best_seconds(bare, 1, warmup=0, device=device))
            t_certify = min(t_certify, best_seconds(certify, 1, warmup=0, device=device))
    result = {"device": str(device), "model": args.model, "image": [3, args.height, args.width],
              "amp": args.amp and device.type == "cuda",
              "ablation": {"samples": args.samples, "batch_size": args.batch_size, "keep": args.keep,
                           "certify_s": round(t_certify, 4), "bare_forward_s": round(t_bare, 4),
                           "ratio": round(t_certify / t_bare, 3)}}
    result.update(receptive_field_costs(model, args, device))
    print(json.dumps(result))


def receptive_field_costs(model, args: argparse.Namespace, device: torch.device) -> dict:
    """Seconds per image of rf-clip and rf-mask on a batch, and of the bare forward pass and count."""
    rf = receptive_field(model)
    images = torch.rand(args.images, 3, args.height, args.width, device=device)
    sides = [RFMaskCertifier.covered_side(PatchSpec(s)) for s in SIDES]
    with torch.no_grad(), autocast(device, args.amp):
        clean = model(images).float()
    calibration = Calibration(float(clean.clamp_min(0).quantile(0.999)), dict.fromkeys(sides, 1.0))

    def bare() -> None:
        model(images).float().sum(dim=(1, 2, 3)).tolist()  # the counts on the host, as a certificate's rows

    out = {}
    for certifier in (RFClipCertifier(rf, calibration), RFMaskCertifier(rf, calibration)):
        t_bare = t_certify = float("inf")
        with torch.no_grad(), autocast(device, args.amp):
            bare()
            certifier.certify_batch(model, images, sides)
            for _ in range(args.repeats):
                t_bare = min(t_bare, best_seconds(bare, 1, warmup=0, device=device))
                t_certify = min(t_certify, best_seconds(lambda c=certifier: c.certify_batch(model, images, sides), 1,
                                                        warmup=0, device=device))
        out[certifier.method] = {"images": args.images, "certify_s_per_image": round(t_certify / args.images, 4),
                                 "bare_forward_s_per_image": round(t_bare / args.images, 4),
                                 "ratio": round(t_certify / t_bare, 3)}
    return out


if __name__ == "__main__":
    main()

"""count.py's throughput, in frames per second, per model and frame size: the bare forward pass, the certified count
(rf-mask at 40 and 81 px: one forward pass, window sums, the rows on the host; target ≤ 1.2× the bare pass), and
whole runs from a video file (MJPG) with decoding in the background thread, as count.py runs, and inline, one after
the other. Prints JSON.

    python benchmarks/count.py [--device cuda] [--models smallfield mcnn]
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from datasets import media  # noqa: E402
from models import build  # noqa: E402
from models.receptive_field import receptive_field  # noqa: E402
from utils.patch import PatchSpec  # noqa: E402
from utils.rf_certify import Calibration, RFMaskCertifier  # noqa: E402
from utils.runtime import pick_device, prepare_model  # noqa: E402
from utils.timing import best_seconds  # noqa: E402

SIDES = (40, 81)
SIZES = ((480, 640), (768, 1024))


def write_video(path: Path, height: int, width: int, frames: int) -> Path:
    """A video of smooth random frames (noise would make the JPEG frames unrepresentatively large)."""
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (width, height))
    for _ in range(frames):
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        writer.write(cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC))
    writer.release()
    return path


def measure(name: str, device: torch.device, height: int, width: int, frames: int, batch: int, repeats: int,
            folder: Path) -> dict:
    torch.manual_seed(0)
    model = build(name)
    rf = receptive_field(model)
    model = prepare_model(model, device).eval()
    cover = [RFMaskCertifier.covered_side(PatchSpec(s)) for s in SIDES]
    certifier = RFMaskCertifier(rf, Calibration(0.1, {c: 1.0 for c in cover}))  # the constants cost nothing
    video = write_video(folder / f"{name}_{height}.avi", height, width, frames)
    source = media.sources([video])
    decoded = [images for _, images in media.batches(source, model.size_multiple, batch)]

    @torch.no_grad()
    def bare() -> None:
        for images in decoded:
            model(images.to(device)).float().sum(dim=(1, 2, 3)).cpu()

    @torch.no_grad()
    def certified() -> None:
        for images in decoded:
            certifier.certify_batch(model, images.to(device), cover)

    def run(prefetch: bool):
        @torch.no_grad()
        def whole() -> None:
            batches = media.batches(source, model.size_multiple, batch)
            for _, images in media.prefetched(batches) if prefetch else batches:
                certifier.certify_batch(model, images.to(device), cover)
        return whole

    def decode() -> None:
        for _ in media.batches(source, model.size_multiple, batch):
            pass

    warmup = int(device.type == "cuda")
    seconds = {k: best_seconds(fn, repeats, warmup, device) for k, fn in
               (("bare", bare), ("certified", certified), ("decode", decode), ("inline", run(False)),
                ("background", run(True)))}
    fps = {k: frames / v for k, v in seconds.items()}
    # decode_share: decoding's share of an inline run; background_speedup: inline over background run time (where
    # decoding is a few per cent of the run, as on the CPU, both runs differ by less than their noise)
    return {"fps": fps, "certificate_cost": seconds["certified"] / seconds["bare"],
            "decode_share": seconds["decode"] / seconds["inline"],
            "background_speedup": seconds["inline"] / seconds["background"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=["smallfield", "mcnn"])
    parser.add_argument("--frames", type=int, help="frames per video; default: 8 on the CPU, 64 on CUDA")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, help="default: 1 on the CPU, 3 on CUDA")
    args = parser.parse_args()
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    frames, repeats = args.frames or (64 if cuda else 8), args.repeats or (3 if cuda else 1)
    result = {"benchmark": "count", "device": str(device), "frames": frames, "batch_size": args.batch_size,
              "sides": list(SIDES), "models": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for height, width in SIZES:
                row = measure(name, device, height, width, frames, args.batch_size, repeats, Path(folder))
                result["models"].setdefault(name, {})[f"{width}x{height}"] = row
                print(f"{name} {width}x{height}: {row}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

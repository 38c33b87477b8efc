"""Every benchmark of this folder in one run, one JSON: density maps, ablation, attack step, certification overheads,
local placement sweeps and per-model throughput at 768×1024 (with, on CUDA, each fast path's speed-up over fp32).
`make bench` runs it.

    python benchmarks/run_all.py [--device cuda] [--out bench.json]
"""
import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from utils.io import save_json  # noqa: E402

BENCHMARKS = ("density", "ablation", "attack", "certify", "sweep", "throughput", "count")


def run(name: str, device: str) -> dict:
    """One benchmark in its own process (a clean allocator and thread pool): its JSON and its wall time."""
    start = time.perf_counter()
    argv = [sys.executable, str(HERE / f"{name}.py")] + (["--device", device] if name != "density" else [])
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"benchmarks/{name}.py failed:\n{proc.stderr[-2000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
               "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    result = {"machine": machine, "benchmarks": {}}
    for name in BENCHMARKS:
        result["benchmarks"][name] = run(name, args.device)
        print(f"{name}: {result['benchmarks'][name]['wall_s']} s", file=sys.stderr)
    if args.out:
        save_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Speed of `sample_indices` against the paper's sequential index sampling (its code, from Levine & Feizi: k draws
per row, each shifted past the earlier ones in a fixed-point loop, so O(k²)), and of the whole `ablate` call against
its memory-bound floor (allocating the filled output and scattering the kept values); prints JSON.

    python benchmarks/ablation.py [--device cuda]
"""
import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils.ablation import FILL, ablate, sample_indices  # noqa: E402
from utils.runtime import pick_device  # noqa: E402
from utils.timing import best_seconds  # noqa: E402


def sequential_indices(d: int, keep: int, rows: int) -> list[list[int]]:
    """The paper's reference: draw from the shrinking range, then shift past each earlier pick until stable."""
    out = []
    for _ in range(rows):
        chosen: list[int] = []
        for i in range(keep):
            r = v = random.randrange(d - i)  # the r-th unit not chosen yet
            while True:  # "boost": v = r + #(earlier picks ≤ v), until it stops moving
                nv = r + sum(1 for c in chosen if c <= v)
                if nv == v:
                    break
                v = nv
            chosen.append(v)
        out.append(chosen)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--reference-rows", type=int, default=1, help="rows timed for the slow reference")
    args = parser.parse_args()
    device = pick_device(args.device)
    d = 3 * 768 * 1024
    result = {"device": str(device), "d": d, "rows": args.rows}
    for keep in (45, 5000):
        fast = best_seconds(lambda k=keep: sample_indices(d, k, args.rows, device=device), 3, device=device)
        ref = best_seconds(lambda k=keep: sequential_indices(d, k, args.reference_rows), 1, warmup=0)
        ref *= args.rows / args.reference_rows  # per-row cost is independent of the other rows
        result[f"keep_{keep}"] = {"sample_indices_s": round(fast, 4), "sequential_s": round(ref, 4),
                                  "speedup": round(ref / fast, 1)}
    x = torch.rand(args.rows, 3, 768, 1024, device=device)
    idx = sample_indices(d, 5000, args.rows, device=device)

    def floor() -> None:  # what any ablation must do: allocate the filled output and scatter the kept values
        torch.full_like(x.view(args.rows, -1), FILL).scatter_(1, idx, x.view(args.rows, -1).gather(1, idx))

    t_floor = best_seconds(floor, 3, device=device)
    t_ablate = best_seconds(lambda: ablate(x, 5000), 3, device=device)
    result["ablate_keep_5000"] = {"ablate_s": round(t_ablate, 4), "floor_s": round(t_floor, 4),
                                  "ratio": round(t_ablate / t_floor, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

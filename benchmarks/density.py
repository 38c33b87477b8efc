"""Speed of `density_map` against the per-head reference on a 768x1024 image with 500 heads; prints JSON."""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from datasets.density import KERNELS, density_map, reference_density_map  # noqa: E402

SHAPE, HEADS, REPEATS = (768, 1024), 500, 10


def _seconds(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    points = np.random.default_rng(0).uniform((0, 0), (SHAPE[1], SHAPE[0]), (HEADS, 2))
    result = {"shape_hw": list(SHAPE), "heads": HEADS}
    for kernel in KERNELS:
        fast = _seconds(lambda k=kernel: density_map(points, SHAPE, k), REPEATS)
        reference = _seconds(lambda k=kernel: reference_density_map(points, SHAPE, k), 1)
        result[kernel] = {"fast_s": round(fast, 5), "reference_s": round(reference, 4),
                          "speedup": round(reference / fast, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

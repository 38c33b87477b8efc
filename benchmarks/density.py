"""Speed of `density_map` against the per-head reference on a 768x1024 image with 500 heads; prints JSON."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from datasets.density import KERNELS, density_map, reference_density_map  # noqa: E402
from utils.timing import best_seconds  # noqa: E402

SHAPE, HEADS, REPEATS = (768, 1024), 500, 10


def main() -> None:
    points = np.random.default_rng(0).uniform((0, 0), (SHAPE[1], SHAPE[0]), (HEADS, 2))
    result = {"shape_hw": list(SHAPE), "heads": HEADS}
    for kernel in KERNELS:
        fast = best_seconds(lambda k=kernel: density_map(points, SHAPE, k), REPEATS)
        reference = best_seconds(lambda k=kernel: reference_density_map(points, SHAPE, k), 1, warmup=0)
        result[kernel] = {"fast_s": round(fast, 5), "reference_s": round(reference, 4),
                          "speedup": round(reference / fast, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

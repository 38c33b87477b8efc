"""Run scripts of the toolkit one after the other in one torchrun launch, each as `python <script> ...` would run
under torchrun (one process group for all, which saves a launch per script); then each rank reports on stderr how
many files it wrote: `rank R wrote N files`.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/torchrun_scripts.py \\
        "train.py --data D --epochs 2" "evaluate.py --weights W --data D/test_data --out E"
"""
import importlib
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import cli, distributed  # noqa: E402
from utils.runtime import pick_device  # noqa: E402

written = []


def _counting(real):
    def call(*args, **kwargs):
        written.append(args)
        return real(*args, **kwargs)
    return call


os.replace, os.mkdir = _counting(os.replace), _counting(os.mkdir)  # every file and folder a script makes


def main() -> None:
    pick_device("cpu")
    for line in sys.argv[1:]:
        script, *argv = shlex.split(line)
        module = importlib.import_module(Path(script).stem)
        try:
            cli.run(module.main, module.get_args_parser(), argv)
        except SystemExit as e:
            if e.code:
                raise
    print(f"rank {distributed.rank()} wrote {len(written)} files", file=sys.stderr)
    distributed.teardown()


if __name__ == "__main__":
    main()

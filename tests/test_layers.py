"""The dependencies point one way: scripts -> the CLI layer (utils.cli, utils.runs) -> experiment code (utils) ->
models / datasets -> the bottom layer (utils.distributed, utils.errors, utils.io, utils.runtime). Read from the
sources' imports."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOTTOM = {"utils.distributed", "utils.errors", "utils.io", "utils.runtime"}
CLI = {"utils.cli", "utils.runs"}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Project modules `path` imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n.split(".")[0] in ("utils", "models", "datasets")}
    return {n for n in found if (REPO / Path(*n.split("."))).with_suffix(".py").is_file()
            or (REPO / Path(*n.split("."))).is_dir()}


def _library() -> list[Path]:
    return sorted(p for folder in ("utils", "models", "datasets") for p in (REPO / folder).glob("*.py"))


@pytest.mark.parametrize("path", _library(), ids=lambda p: _module(p))
def test_each_library_module_imports_only_downwards(path):
    module, imported = _module(path), _imports(path)
    if module in BOTTOM:
        allowed = BOTTOM
    elif module.startswith(("models", "datasets")):
        allowed = BOTTOM | {m for m in imported if m.startswith(("models", "datasets"))}
    elif module in CLI:
        allowed = imported  # the CLI layer may use all of the library
    else:
        allowed = imported - CLI
    assert imported <= allowed | {"utils"}, f"{module} imports {sorted(imported - allowed)}"


@pytest.mark.parametrize("path", [p for p in _library() if _module(p) not in CLI], ids=lambda p: _module(p))
def test_the_library_neither_prints_nor_reads_command_lines(path):
    tree = ast.parse(path.read_text())
    calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert "print" not in calls, f"{_module(path)} prints: report through logging or return values instead"
    assert "argparse" not in {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}

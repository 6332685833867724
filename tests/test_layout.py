"""The package's layers: imports only go down, and no two modules import each other.

Layers, lowest first (docs/architecture.md): the foundation (stats, reference, _checks), kernels,
core, family, lifecycle, the package root (the public surface), then bench and lab (users of the
public surface, which never import each other), then the CLI. Every import is counted, also those
inside functions (lazy imports still make the dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "batchnorm"
RANK = {"stats": 0, "reference": 0, "_checks": 0, "kernels": 1, "core": 2, "family": 3, "lifecycle": 4,
        "__init__": 4.5, "bench": 5, "lab": 5, "cli": 6}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the batchnorm modules (or packages) that ``path`` imports."""
    name = _module_name(path)
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "batchnorm"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "batchnorm":
                continue
            for a in node.names:  # "from . import x" may import a submodule x
                sub = f"{mod}.{a.name}"
                found.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (PKG.parent / sub.replace(".", "/")).is_dir() else mod)
    return found


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


GRAPH = {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def test_every_module_belongs_to_a_layer():
    assert {_layer(m) for m in GRAPH} <= set(RANK), sorted({_layer(m) for m in GRAPH} - set(RANK))


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_imports_only_go_down(mod):
    src = _layer(mod)
    bad = []
    for target in GRAPH[mod]:
        dst = _layer(target)
        if RANK[dst] > RANK[src] or (dst != src and RANK[dst] == RANK[src]):
            bad.append(f"{target} ({dst})")
    assert not bad, f"{mod} ({src}, rank {RANK[src]}) imports upward or sideways: {bad}"


def test_no_import_cycles():
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t == m or t not in GRAPH or m.startswith(t + "."):
                continue  # a module importing its own package's __init__ is not a cycle of modules
            if seen.get(t) == 1:
                cycle = [*stack[stack.index(t):], t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in seen:
                visit(t)
        stack.pop()
        seen[m] = 2

    for m in sorted(GRAPH):
        if m not in seen:
            visit(m)


@pytest.mark.parametrize("old", ["functional", "autograd", "ops", "modules", "_bnlayers", "renorm", "ghost",
                                 "inplace", "sync", "recalibrate", "freeze", "fold", "convert", "checkpoint",
                                 "conventions", "onnx", "diagnostics", "benchmark", "benchmark_inplace"])
def test_old_module_paths_are_aliases_of_the_moved_modules(old):
    import importlib

    import batchnorm

    moved = importlib.import_module(f"batchnorm.{batchnorm._MOVED[old]}")
    assert importlib.import_module(f"batchnorm.{old}") is moved


def test_a_pickle_naming_an_old_module_path_loads():
    import pickle

    import torch

    import batchnorm

    layer = batchnorm.BatchNorm2d(3)
    layer.running_mean.add_(1.5)
    # protocol 0 names classes as text lines ("c<module>\n<name>\n"), so the path can be rewritten
    old = pickle.dumps(layer, protocol=0).replace(b"batchnorm.core.modules\n", b"batchnorm.modules\n")
    assert b"batchnorm.modules\n" in old and b"batchnorm.core" not in old
    back = pickle.loads(old)
    assert type(back) is batchnorm.BatchNorm2d
    assert torch.equal(back.running_mean, layer.running_mean)


def test_importing_the_package_imports_no_subpackage_it_does_not_need():
    import subprocess
    import sys

    code = ("import sys, batchnorm; print(sorted(m for m in sys.modules if m.startswith('batchnorm.') "
            "and m.split('.')[1] in ('lab', 'bench')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_importing_an_old_path_keeps_the_package_names_and_the_modules_specs():
    import subprocess
    import sys

    # a fresh process: the first import of each old path is what could rebind a name
    code = ("import warnings; warnings.simplefilter('error')\n"
            "import batchnorm.recalibrate, batchnorm.freeze, batchnorm.inplace, batchnorm.ops\n"
            "import batchnorm, torch\n"
            "assert callable(batchnorm.recalibrate) and callable(batchnorm.freeze), 'function rebound'\n"
            "assert batchnorm.ops.__spec__.name == 'batchnorm.core.ops', batchnorm.ops.__spec__\n"
            "assert batchnorm.inplace.__spec__.name == 'batchnorm.family.inplace'\n"
            "batchnorm.InPlaceABN2d(3)(torch.randn(4, 3, 5, 5))  # relative imports inside still resolve\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

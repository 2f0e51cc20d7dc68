"""Layering: folders are the layers, and imports point one way (docs/architecture.md).

    schemas  <-  pipeline.core  <-  pipeline.data  <-  actors  <-  pipeline.driver  <-  pipeline.train / cli
                 pipeline.core  <-  pipeline.analysis  <-  pipeline.train / cli

Checked statically on every module (function-level imports included), and at run time for the pure
layers: importing them loads no Ray, vLLM or DeepSpeed. vLLM is imported only by the generator and by the
weight-transfer module (both ends of vLLM's own protocol); DeepSpeed only by the learner.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OWN = ("schemas", "pipeline", "actors")
HEAVY = ("ray", "vllm", "deepspeed")
LAYERS = {  # layer -> covrl packages it may import
    "schemas": ("schemas",),
    "pipeline.core": ("schemas", "pipeline.core"),
    "pipeline.data": ("schemas", "pipeline.core", "pipeline.data"),
    "pipeline.analysis": ("schemas", "pipeline.core", "pipeline.analysis"),
    "actors": ("schemas", "pipeline.core", "pipeline.data", "actors"),
    "pipeline.driver": (
        "schemas",
        "pipeline.core",
        "pipeline.data",
        "pipeline.analysis",
        "actors",
        "pipeline.driver",
    ),
}
ENTRY_POINTS = ("pipeline.train", "pipeline.cli")
NO_HEAVY = ("schemas", "pipeline.core", "pipeline.data", "pipeline.analysis")
ONLY_IN = {"vllm": ("actors.generator", "actors.weight_transfer"), "deepspeed": ("actors.learner",)}


def modules() -> dict[str, Path]:
    out = {}
    for top in OWN:
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(path: Path, module: str) -> set[str]:
    """Every module name ``path`` imports, at any depth (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = (
                    module.split(".")[: -node.level] if not path.name == "__init__.py" else module.split(".")
                )
                base = ".".join([*pkg, base] if base else pkg)
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}  # `from pipeline.data import addition`
    return names


def layer_of(module: str) -> str | None:
    for layer in sorted(LAYERS, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


MODULES = modules()


def test_every_module_belongs_to_a_layer_or_is_an_entry_point():
    stray = [m for m in MODULES if m not in ENTRY_POINTS and m not in ("pipeline",) and layer_of(m) is None]
    assert not stray, f"modules outside the layers: {stray}"
    assert len(MODULES) > 60  # the check must see the whole tree


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m)))
def test_imports_point_one_way(module):
    layer = layer_of(module)
    own = {n for n in imported(MODULES[module], module) if within(n, OWN) and n not in OWN}
    bad = sorted(n for n in own if not within(n, LAYERS[layer]))
    assert not bad, f"{module} ({layer}) imports {bad}"
    heavy = {n.split(".")[0] for n in imported(MODULES[module], module)} & set(HEAVY)
    if within(module, NO_HEAVY):
        assert not heavy, f"{module} is in a pure layer but imports {sorted(heavy)}"
    for lib, allowed in ONLY_IN.items():
        if lib in heavy:
            assert module in allowed, f"only {allowed} may import {lib}; {module} does"


def test_nothing_imports_the_entry_points():
    for module, path in MODULES.items():
        hits = sorted(n for n in imported(path, module) if within(n, ENTRY_POINTS))
        assert module in ENTRY_POINTS or not hits, f"{module} imports entry point(s) {hits}"


def test_pure_layers_load_no_heavy_framework_at_run_time():
    pure = sorted(m for m in MODULES if within(m, NO_HEAVY))
    code = (
        "import importlib, json, sys\n"
        f"for m in {pure!r}: importlib.import_module(m)\n"
        f"print(json.dumps([h for h in {HEAVY!r} if h in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []

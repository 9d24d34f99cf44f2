"""The layers of the repository, checked on the import graph (every `import` / `from ... import` statement, those
inside functions included, read with `ast`): no import cycle among our modules and no upward import.

Layers, bottom to top (a module may import its own layer and the ones below):
  0  wan_kernels            the ops and their kernels
  1  wan_model.core         the pure model: config, rope, model, parallel, sampling
  2  wan_model.compat       key maps / layouts, diffusers' spellings, quantization, LoRA, the diffusers drop-in
     wan_model.quant        the quantization methods (one module each behind one interface)
  3  wan_model.io           files: the atomic writer, formats, GGUF, checkpoints, conversions
  4  wan_model (the rest)   the public WanModel, the cost model, the CLI
  5  tools, bench           the GPU check, readiness, AOT helpers; benchmarks
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("wan_kernels", "wan_model", "tools", "bench")
LAYERS = [("wan_kernels", 0), ("wan_model.core", 1), ("wan_model.compat", 2), ("wan_model.quant", 2), ("wan_model.io", 3),
          ("wan_model", 4), ("tools", 5), ("bench", 5)]


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def layer(module: str) -> int:
    return next(rank for prefix, rank in LAYERS if module == prefix or module.startswith(prefix + "."))


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (`from pkg import sub` counts as importing pkg.sub when that is a
    module; the compiled extension wan_kernels._C counts as itself, not as the package)."""
    known = set(mods) | {"wan_kernels._C"}
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in known:  # `import a.b.c` imports a, a.b, a.b.c: the deepest of ours counts
                    t = t.rpartition(".")[0]
                if t and t != name and t in mods:
                    deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


GRAPH = import_graph(modules())


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_no_upward_import():
    upward = sorted(f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
                    for m, deps in GRAPH.items() for d in deps if layer(d) > layer(m))
    assert upward == []


def test_the_checker_sees_cycles_and_upward_imports():
    """The checks above can fail: a made-up graph with a cycle and an upward edge is caught."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    graph = dict(GRAPH)
    graph["wan_model.core.model"] = graph["wan_model.core.model"] | {"wan_model.io.checkpoint"}
    assert any(layer(d) > layer(m) for m, deps in graph.items() for d in deps)
    assert "wan_model.compat.lora" in GRAPH["wan_model.model"]  # imports inside functions are seen


@pytest.mark.subprocess
@pytest.mark.parametrize("module, allowed", [
    ("wan_model.core.model", ("wan_model.core",)),
    ("wan_kernels", ()),
])
def test_importing_a_layer_loads_nothing_above_it(module, allowed):
    """`import wan_model.core.model` loads no compat, io, CLI or cost code; `import wan_kernels` loads no wan_model,
    tools or bench code (checked in a fresh interpreter, on sys.modules)."""
    code = (f"import sys, {module}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wan_model', 'tools', 'bench')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    loaded = set(eval(r.stdout))
    above = sorted(m for m in loaded if m != "wan_model" and not m.startswith(tuple(a + "." for a in allowed))
                   and m not in allowed)
    assert above == [], above

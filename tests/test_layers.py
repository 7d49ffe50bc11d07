"""The package's layers, enforced on its import graph (docs/architecture.md).

Every ``import`` statement of every vitq module counts, at module level and inside functions (a lazy import is still
a dependency). The graph must have no cycle, between modules or between packages, and no forbidden edge:

* ``vitq.runtime`` and ``vitq.plugins``, and the tools a device runs on an artifact (``vitq eval``, ``bench``,
  ``serve``, ``bundle verify``, ``export-triton``, ``check``), with everything they import transitively, use only the
  standard library, numpy, onnx (+ its ml_dtypes), onnxruntime, Pillow and tqdm (TensorRT and cuda-python behind
  ``vitq[trt]``), and no vitq compiler package (passes, recipe, quant, mixa, exporter, the compiler);
* ``vitq.plugins`` imports no other vitq package but the artifact format and the errors: a leaf;
* ``vitq.passes`` and ``vitq.recipe`` import neither torch nor timm, nor the torch side of vitq;
* ``import vitq.cli`` (module level) reaches no torch, timm, onnx-ir or onnxscript: the runtime commands work on a
  runtime-only install.

The checker itself is tested on a synthetic module set (it must catch a cycle, a lazy forbidden import, and a
forbidden package reached transitively).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "vitq"

# triton_python_backend_utils: provided by Triton's python backend to vitq.triton's model, inside the server
RUNTIME_THIRD_PARTY = {"numpy", "onnx", "ml_dtypes", "onnxruntime", "PIL", "tqdm", "tensorrt", "cuda",
                       "triton_python_backend_utils"}
COMPILER_ONLY = ("vitq.passes", "vitq.recipe", "vitq.quant", "vitq.mixa", "vitq.exporter", "vitq.compiler",
                 "vitq.targets")
RUNTIME_TOOLS = ("vitq.evaluate", "vitq.benchmark", "vitq.serve", "vitq.data", "vitq.trt.bundle", "vitq.triton",
                 "vitq.regression")
TORCH_SIDE = ("vitq.quant", "vitq.mixa", "vitq.exporter", "vitq.compiler")
HEAVY = {"torch", "timm", "torchvision", "onnx_ir", "onnxscript"}


# -- the checker ---------------------------------------------------------------------------------------------------
def sources_of(root: Path = ROOT) -> dict[str, tuple[str, bool]]:
    """{module name: (source, is_package)} for every .py file under ``root`` (the vitq package)."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (p.read_text(), is_pkg)
    return out


def imports_of(name: str, src: str, is_pkg: bool, modules: set[str], module_level_only: bool = False
               ) -> tuple[set[str], set[str]]:
    """(vitq modules, third-party top-level names) imported by module ``name`` anywhere in its source (or only at
    module level). ``from pkg import x`` counts ``pkg.x`` when that is a module, else ``pkg``; importing a module
    also runs its parent packages' ``__init__``, which count too (except the importer's own ancestors)."""
    tree = ast.parse(src)
    pkg = name if is_pkg else name.rpartition(".")[0]
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # statements at module level, including inside if/try blocks there
        flat, todo = [], list(tree.body)
        while todo:
            n = todo.pop()
            flat.append(n)
            if isinstance(n, (ast.If, ast.Try)):
                todo += n.body + n.orelse + getattr(n, "finalbody", []) + [
                    s for h in getattr(n, "handlers", []) for s in h.body]
        nodes = flat
    targets: set[str] = set()
    third: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg.split(".")
                base = base[:len(base) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in n.names]
        else:
            continue
        for m in names:
            top = m.split(".")[0]
            if top != "vitq":
                if top not in sys.stdlib_module_names and top != "__future__":
                    third.add(top)
                continue
            while m and m not in modules:  # ``import vitq.a.b`` of an attribute path: the module that holds it
                m = m.rpartition(".")[0]
            if not m:
                continue
            targets.add(m)
            parent = m.rpartition(".")[0]
            while parent and parent != "vitq":
                if not (name == parent or name.startswith(parent + ".")):
                    targets.add(parent)
                parent = parent.rpartition(".")[0]
    targets.discard(name)
    return targets, third


def build_graph(sources: dict[str, tuple[str, bool]], module_level_only: bool = False
                ) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    mods = set(sources)
    graph, third = {}, {}
    for name, (src, is_pkg) in sources.items():
        graph[name], third[name] = imports_of(name, src, is_pkg, mods, module_level_only)
    return graph, third


def unit(module: str) -> str:
    """The layer a module belongs to: its top-level vitq package (``vitq.passes``), or the top-level module itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for a, bs in graph.items():
        for b in bs:
            if unit(a) != unit(b):
                g.setdefault(unit(a), set()).add(unit(b))
    return g


def reach(graph: dict[str, set[str]], starts) -> dict[str, list[str]]:
    """Every module reachable from ``starts``, with one import path to it."""
    paths = {s: [s] for s in starts}
    todo = list(starts)
    while todo:
        a = todo.pop()
        for b in sorted(graph.get(a, ())):
            if b not in paths:
                paths[b] = paths[a] + [b]
                todo.append(b)
    return paths


def in_pkg(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every broken layering rule of the module set, one readable line each (empty: the layers hold)."""
    graph, third = build_graph(sources)
    out = [f"import cycle between modules: {' <-> '.join(c)}" for c in cycles(graph)]
    out += [f"import cycle between packages: {' <-> '.join(c)}" for c in cycles(package_graph(graph))]
    mods = set(sources)
    for layer in ("vitq.runtime", "vitq.plugins", *RUNTIME_TOOLS):
        starts = [m for m in mods if in_pkg(m, [layer])]
        for m, path in sorted(reach(graph, starts).items()):
            chain = " -> ".join(path)
            if in_pkg(m, COMPILER_ONLY):
                out.append(f"{layer} reaches the compiler module {m}: {chain}")
            bad = sorted(third[m] - RUNTIME_THIRD_PARTY)
            if bad:
                out.append(f"{layer} reaches {bad} through {chain}")
    for m in sorted(mods):
        if in_pkg(m, ["vitq.plugins"]):
            others = {t for t in graph[m] if not in_pkg(t, ["vitq.plugins", "vitq.format", "vitq.errors"])}
            if others:
                out.append(f"vitq.plugins is a leaf, but {m} imports {sorted(others)}")
        if in_pkg(m, ["vitq.passes", "vitq.recipe"]):
            heavy = third[m] & {"torch", "timm", "torchvision"}
            if heavy:
                out.append(f"{m} imports {sorted(heavy)} (passes and recipes never import torch)")
            side = {t for t in graph[m] if in_pkg(t, TORCH_SIDE)}
            if side:
                out.append(f"{m} imports the torch side: {sorted(side)}")
    if "vitq.cli" in mods:
        g0, t0 = build_graph(sources, module_level_only=True)
        for m, path in sorted(reach(g0, ["vitq.cli"]).items()):
            if t0[m] & HEAVY:
                out.append(f"import vitq.cli reaches {sorted(t0[m] & HEAVY)} at module level: {' -> '.join(path)}")
    return out


# -- the package ---------------------------------------------------------------------------------------------------
def test_vitq_layers_hold():
    problems = violations(sources_of())
    assert not problems, "\n".join(problems)


def test_the_graph_sees_the_package():
    graph, third = build_graph(sources_of())
    assert "vitq.runtime.ort_backend" in graph["vitq.runtime.engine"]  # a lazy import inside a method
    assert "vitq.plugins.expand" in graph["vitq.runtime.ort_backend"]
    assert "onnxruntime" in third["vitq.runtime.ort_backend"]
    assert "torch" in third["vitq.quant.functional"]
    assert "vitq.passes.infra" in graph["vitq.passes.lower_trt"]


# -- the checker can fail ------------------------------------------------------------------------------------------
def _synthetic(**mods: str) -> dict[str, tuple[str, bool]]:
    out = {"vitq": ("", True)}
    for k, src in mods.items():
        name = "vitq." + k.replace("__", ".")
        out[name] = (src, False)
    for name in list(out):  # the packages the modules live in
        parts = name.split(".")
        for i in range(2, len(parts)):
            out.setdefault(".".join(parts[:i]), ("", True))
    return out


def test_checker_accepts_a_layered_set():
    ok = _synthetic(runtime__engine="import numpy\nfrom ..plugins import expand\n",
                    plugins__expand="import onnx\nfrom ..errors import E\n", errors="",
                    passes__p="import onnx_ir\nfrom ..plugins.expand import f\n")
    assert violations(ok) == []


@pytest.mark.parametrize("mods, needle", [
    ({"passes__a": "from . import b\n", "passes__b": "def f():\n    from .a import x\n"},
     "cycle between modules"),
    ({"recipe__s": "def f():\n    from ..mixa.spec import M\n", "mixa__spec": "from ..recipe.s import R\n"},
     "cycle between packages"),
    ({"runtime__ort": "def load():\n    import onnx_ir\n"}, "vitq.runtime reaches ['onnx_ir']"),
    ({"runtime__ort": "def load():\n    from ..plugins.low import f\n",
      "plugins__low": "from ..passes.dq import g\n", "passes__dq": "import onnx_ir\n"},
     "vitq.runtime reaches the compiler module vitq.passes"),
    ({"runtime__e": "from ..util import h\n", "util": "import torch\n"}, "vitq.runtime reaches ['torch']"),
    ({"plugins__x": "from ..table import t\n", "table": ""}, "vitq.plugins is a leaf"),
    ({"passes__y": "def f():\n    import torch\n"}, "passes and recipes never import torch"),
    ({"passes__y": "from ..quant.sim import s\n", "quant__sim": ""}, "imports the torch side"),
    ({"cli": "from .compiler import c\n", "compiler": "import torch\n"}, "import vitq.cli reaches ['torch']"),
])
def test_checker_catches(mods, needle):
    problems = violations(_synthetic(**mods))
    assert any(needle in p for p in problems), problems


def test_checker_ignores_lazy_heavy_imports_for_the_cli_module_level_rule():
    lazy = _synthetic(cli="def compile_cmd():\n    from .compiler import c\n", compiler="import torch\n")
    assert not [p for p in violations(lazy) if "vitq.cli" in p]

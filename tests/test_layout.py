"""The package's structure as docs/architecture.md describes it, checked from the sources: one autograd Function per
op family, no import cycle, no module over 500 lines, no private name imported across modules, nothing written to
os.environ at import, and no test patching a dropreg module's globals."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "dropreg")
MAX_FUNCTIONS = 6
MAX_LINES = 500


def _modules() -> dict[str, str]:
    """Dotted module name -> path, for every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _tree(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def _imports(module: str, tree) -> list[tuple[str, list[str], int]]:
    """``(imported module, names, line)`` for each import of a dropreg module, relative ones resolved."""
    package = module if MODULES[module].endswith("__init__.py") else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("dropreg"):
                continue
            names = [a.name for a in node.names]
            for name in names:  # "from . import x" imports module x
                if f"{target}.{name}" in MODULES:
                    out.append((f"{target}.{name}", [], node.lineno))
            if target in MODULES:
                out.append((target, [n for n in names if f"{target}.{n}" not in MODULES], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name in MODULES]
    return out


def test_at_most_six_autograd_functions():
    functions = []
    for module, path in MODULES.items():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ClassDef) and any(
                    ast.unparse(base) in ("torch.autograd.Function", "Function") for base in node.bases):
                functions.append(f"{module}.{node.name}")
    assert len(functions) <= MAX_FUNCTIONS, functions


def test_no_module_over_500_lines():
    long = {}
    for module, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            count = sum(1 for _ in f)
        if count > MAX_LINES:
            long[module] = count
    assert not long, long


def test_no_import_cycle():
    graph = {module: {target for target, _, _ in _imports(module, _tree(path)) if target != module}
             for module, path in MODULES.items()}
    # a package's __init__ importing its own submodules is not a cycle of the layers
    for module in graph:
        graph[module] = {t for t in graph[module] if not (MODULES[module].endswith("__init__.py")
                                                           and t.startswith(module + "."))}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_no_private_name_imported_across_modules():
    crossing = []
    for module, path in MODULES.items():
        for target, names, line in _imports(module, _tree(path)):
            crossing += [f"{module}:{line} imports {target}.{n}" for n in names
                         if n.startswith("_") and not n.startswith("__") and n != "_C"]  # _C: the C++ library
    assert not crossing, crossing


def test_nothing_writes_os_environ_at_import():
    writes = []
    for module, path in MODULES.items():
        for node in _tree(path).body:  # module level only: a function may set a variable for a subprocess
            text = ast.unparse(node)
            if re.search(r"os\.environ(\[[^\]]+\]\s*=|\.setdefault\(|\.update\(|\.pop\()", text):
                writes.append(f"{module}: {text.splitlines()[0]}")
    assert not writes, writes


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.dirname(__file__)) if n.endswith(".py")))
def test_no_test_patches_a_dropreg_module(name):
    """Tests pick blocks and epilogues with a BlockPlan (dropreg.get_backend(...).with_plan(...)) and try other
    backends by passing them as ``backend=``, not by replacing a module's functions, constants or table entries."""
    with open(os.path.join(os.path.dirname(__file__), name), encoding="utf-8") as f:
        text = f.read()
    patched = re.findall(r"monkeypatch\.(?:setattr|setitem|delattr|delitem)\((?:dropreg\.[\w.]+|chunked|streamed)[^)]*\)",
                         text)
    patched += re.findall(r"^\s*dropreg\.\w+\.\w+\s*=", text, flags=re.MULTILINE)
    assert not patched, patched


def test_import_dropreg_is_cheap_and_does_not_load_the_compiler():
    """``import dropreg`` loads neither torch._dynamo nor Inductor (about a second), and costs little over ``import
    torch``: the median of three fresh processes, against a 0.3 s budget."""
    import statistics
    import subprocess
    import sys
    probe = ("import sys, time; t = time.perf_counter(); import torch; a = time.perf_counter(); import dropreg; "
             "b = time.perf_counter(); print(b - a, int('torch._dynamo' in sys.modules), "
             "int('torch._inductor' in sys.modules))")
    runs = [subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                           timeout=120).stdout.split() for _ in range(3)]
    assert all(run[1:] == ["0", "0"] for run in runs), runs
    assert statistics.median(float(run[0]) for run in runs) < 0.3, runs

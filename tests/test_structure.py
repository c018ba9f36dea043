"""The package's shape: imports point down (no cycle between modules, lazy imports included), the model knows
nothing of processes, precision providers or the trainer, and private torch APIs are used in one module only."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moetrain"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every module's moetrain imports, wherever they stand in the file (``from moetrain.x import y``, where y is
    a module, counts as an import of moetrain.x.y)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moetrain"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("moetrain"))
        edges[name] = {m for m in found if m in modules and m != name}
    return edges


def test_no_module_imports_itself_through_others():
    edges = _imports()
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            assert state.get(n) != 1, " -> ".join(path[path.index(n):] + [n]) if n in path else (m, n)
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_the_model_layer_knows_nothing_above_it():
    edges, files = _imports(), {_module(p): p for p in PACKAGE.rglob("*.py")}
    above = ("moetrain.parallel", "moetrain.precision", "moetrain.config", "moetrain.trainer", "moetrain.train",
             "moetrain.runner", "moetrain.checkpoint", "moetrain.data")
    for m, targets in edges.items():
        if m.startswith("moetrain.model"):
            assert not [t for t in targets if t.startswith(above)], (m, targets)
            assert "torch.distributed" not in files[m].read_text(), m


def test_private_torch_apis_live_in_compat():
    """A private attribute of torch (``torch._x``, ``torch.a._b``, ``obj._flatten(``-style calls of torch objects)
    is named only in moetrain/_compat.py, which says which torch version each was checked on."""
    private = re.compile(r"\btorch(\.[A-Za-z]\w*)*\._[a-z]\w*|\._(flatten|set_params_and_buffers_to_ignore_for_model|"
                         r"record_memory_history|dump_snapshot)\(|checkpoint\._traverse")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if private.search(code) and not code.strip().startswith(('"', "'")):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_starting_a_rank_imports_no_compiler():
    """A rank of ``moetrain train`` (and the CLI) loads neither dynamo nor inductor unless it compiles: they take
    ~2 s of every process's start on 2 cores, more than torch itself, and most runs never compile."""
    import subprocess
    import sys

    code = ("import sys, moetrain.cli, moetrain.train, moetrain.trainer, moetrain.model, moetrain.precision\n"
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"

"""The library's shape: no Prefect anywhere in src/mnist_flow, and no import cycle between its modules.

Imports inside functions count too: a cycle hidden in a function body is still a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "src" / "mnist_flow"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py")) if "versions" not in p.parts}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (imports for annotations only, never run)."""
    nodes: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement in ``path`` names, anywhere in the file (functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return names


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for target in imported_names(path, name):
            # `import mnist_flow.a.b` also runs mnist_flow.a's __init__; keep the deepest library module named
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != "mnist_flow":
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_library_module_names_prefect_in_an_import():
    offenders = {name: sorted(n for n in imported_names(path, name) if n.split(".")[0] == "prefect")
                 for name, path in library_modules().items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_library_module_loads_no_prefect():
    # alembic's env.py runs only inside alembic (it reads alembic.context.config at import); __main__ runs the CLI
    names = sorted(n for n in library_modules() if not n.endswith((".migrations.env", ".__main__")))
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


def test_a_trial_process_and_the_cli_start_without_importing_torchvision():
    # torchvision's import (its models and ops) costs 1-2 s of every process start; only a download needs it
    code = ("import sys, tempfile\n"
            "from pathlib import Path\n"
            "import flows.trials, mnist_flow.cli, mnist_flow.pipeline, mnist_flow.review.serve\n"
            "from mnist_flow.data.datasets import load_dataset\n"
            "load_dataset('mnist', 'sample', cache_dir=Path(tempfile.mkdtemp()))\n"
            "print('torchvision' in sys.modules)\n")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                         cwd=root)
    assert out.stdout.strip() == "False"


def test_the_library_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function_body(tmp_path):
    # the checker itself: a two-module cycle whose second edge sits inside a function
    a = tmp_path / "a.py"
    a.write_text("from mnist_flow import b\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    from mnist_flow.a import x\n")
    assert "mnist_flow.b" in imported_names(a, "mnist_flow.a")
    assert "mnist_flow.a" in imported_names(b, "mnist_flow.b")
    assert cycles({"mnist_flow.a": {"mnist_flow.b"}, "mnist_flow.b": {"mnist_flow.a"}}) == [
        ["mnist_flow.a", "mnist_flow.b"]]

"""The package's layering, read from the source: the imports of every module (module level and
inside functions), resolved to deltalm modules.

- No import cycles between modules, lazy (function-level) imports included: a cycle means two
  modules each need the other, and one of them holds something that belongs elsewhere.
- The runtime (every ``deltalm`` module outside ``deltalm.export`` and ``deltalm.bench``) imports
  neither torch nor ``deltalm.export`` at module level: ``deltalm translate`` runs without torch.
- Command modules (``deltalm.commands.*``, ``deltalm.cli``) are imported by nothing but the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# folder -> package name, as pyproject.toml maps them
PACKAGES = {
    "runtime": "deltalm",
    "export": "deltalm.export",
    "bench": "deltalm.bench",
    "serve": "deltalm.serve",
    "cluster": "deltalm.cluster",
}
NOT_RUNTIME = ("deltalm.export", "deltalm.bench")


def module_files() -> dict[str, Path]:
    mods = {}
    for folder, package in PACKAGES.items():
        base = ROOT / folder
        if not base.is_dir():
            continue
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([package, *parts])] = f
    return mods


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported deltalm module or external top-level name, at module level?) for ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = []

    def resolve(module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        base = package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def visit(node, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, top))
            elif isinstance(child, ast.ImportFrom):
                target = resolve(child.module, child.level)
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    found.append((sub if sub in known else target, top))
            visit(child, inner)

    visit(tree, True)
    out = []
    for target, top in found:
        if target.startswith("deltalm"):
            while target not in known and "." in target:  # a name inside a module
                target = target.rpartition(".")[0]
        out.append((target, top))
    return out


@pytest.fixture(scope="module")
def graph():
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def is_runtime(name: str) -> bool:
    return name.startswith("deltalm") and not any(name == p or name.startswith(p + ".") for p in NOT_RUNTIME)


def test_there_are_no_import_cycles(graph):
    edges = {m: {t for t, _ in targets if t in graph and t != m} for m, targets in graph.items()}
    # a package's __init__ importing its own submodules (re-exports) is not a dependency cycle
    for m in edges:
        edges[m] = {t for t in edges[m] if not t.startswith(m + ".")}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t) :] + [t]))
            elif t not in state:
                walk(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            walk(m)
    assert cycles == []


def test_the_runtime_imports_neither_torch_nor_export_at_module_level(graph):
    bad = sorted(
        f"{m} imports {t}"
        for m, targets in graph.items()
        if is_runtime(m)
        for t, top in targets
        if top and (t.split(".")[0] in ("torch", "onnx") or t.startswith("deltalm.export"))
    )
    assert bad == []


def test_command_modules_are_imported_only_by_the_cli(graph):
    commands = {m for m in graph if m.startswith("deltalm.commands.")}
    bad = sorted(
        f"{m} imports {t}"
        for m, targets in graph.items()
        for t, _ in targets
        if t in commands and m not in ("deltalm.cli", "deltalm.commands") and not m.startswith("deltalm.commands.")
    )
    assert bad == []


def test_the_layering_check_sees_a_cycle_when_there_is_one(tmp_path):
    """The checks above can fail: two modules importing each other are found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from deltalm.b import x\n")
    b.write_text("def f():\n    from deltalm.a import y\n")
    known = {"deltalm.a", "deltalm.b"}
    assert imports_of("deltalm.a", a, known) == [("deltalm.b", True)]
    assert imports_of("deltalm.b", b, known) == [("deltalm.a", False)]

"""The house rules a reader can check without running anything, read from the source with ``ast``.

- no ``.py`` file over 500 lines, no function over 120 lines;
- no import cycle between the project's modules: an import at module level and one inside a
  function both make an edge (both run, only at different times), one under ``if TYPE_CHECKING:``
  does not;
- the floor plan (docs/architecture.md): ``protocol`` and ``infra`` on the ground floor,
  ``generator_service`` and ``trainer`` above them and blind to each other, ``experiments`` and
  ``benchmarks`` on top; ``infra`` imports no ``protocol`` (``protocol`` uses ``infra``).

Every failure lists every offender (file, function, cycle or import with its line), not the first.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "infra", "generator_service", "trainer", "experiments", "benchmarks")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 120

#: package -> the project packages it must never import
FORBIDDEN_IMPORTS = {
    "protocol": ("generator_service", "trainer", "experiments", "benchmarks"),
    "infra": ("protocol", "generator_service", "trainer", "experiments", "benchmarks"),
    "generator_service": ("trainer", "experiments", "benchmarks"),
    "trainer": ("generator_service", "experiments", "benchmarks"),
    "experiments": ("benchmarks",),
}


@dataclass(frozen=True)
class Import:
    """One import statement's target: ``name`` absolute and dotted, ``line`` in the importing file."""

    name: str
    line: int


def module_name(path: Path) -> str:
    """``trainer/models/small_cnn.py`` -> ``trainer.models.small_cnn``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=None)
def project_files() -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file under :data:`PACKAGES`."""
    files: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[module_name(path)] = path
    return files


@lru_cache(maxsize=None)
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST):
    """Every Import/ImportFrom under ``node`` (function bodies included), skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                if isinstance(other, (ast.Import, ast.ImportFrom)):
                    yield other
                else:
                    yield from _import_nodes(other)
        else:
            yield from _import_nodes(child)


def imports_of(module: str) -> list[Import]:
    """The absolute names ``module`` imports: ``import a.b`` -> ``a.b``; ``from a import b`` -> ``a.b``
    (the caller keeps whichever prefix is a module); relative imports resolved against the package."""
    path = project_files()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []
    for node in _import_nodes(parsed(path)):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno) for alias in node.names]
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        found += [Import(f"{base}.{alias.name}" if alias.name != "*" else base, node.lineno) for alias in node.names]
    return found


def resolve(name: str) -> str | None:
    """The project module an import name lands in: the longest dotted prefix that is one (None: not ours)."""
    files = project_files()
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in files:
            return candidate
    return None


@lru_cache(maxsize=None)
def import_graph() -> dict[str, dict[str, int]]:
    """Module -> {imported project module: line of the first such import}; no self edges."""
    graph: dict[str, dict[str, int]] = {}
    for module in project_files():
        edges: dict[str, int] = {}
        for imp in imports_of(module):
            target = resolve(imp.name)
            if target is not None and target != module:
                edges.setdefault(target, imp.line)
        graph[module] = edges
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (each one holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def one_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, as ``[a, b, ..., a]`` (breadth first)."""
    members, start = set(component), component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, node, start]
                if nxt in members and nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {component}")


def describe_cycle(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    files = project_files()
    steps = [f"{files[a].relative_to(ROOT)}:{graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + " (" + "; ".join(steps) + ")"


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def test_the_walk_sees_every_package():
    modules = project_files()
    for package in PACKAGES:
        assert package in modules, f"{package}/__init__.py not found under {ROOT}"
    assert len(modules) > 100, f"only {len(modules)} modules found under {ROOT}"


def test_no_file_over_the_line_limit():
    long_files = []
    for path in project_files().values():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long_files, f"files over {MAX_FILE_LINES} lines:\n" + "\n".join(long_files)


def test_no_function_over_the_line_limit():
    long_functions = []
    for path in project_files().values():
        for name, node in _functions(parsed(path)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}(): {lines} lines")
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long_functions)


def test_no_import_cycle_between_project_modules():
    graph = import_graph()
    cycles = [describe_cycle(graph, one_cycle(graph, component)) for component in strongly_connected(graph)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_floor_plan():
    wrong = []
    for module, path in project_files().items():
        forbidden = FORBIDDEN_IMPORTS.get(module.split(".")[0], ())
        for imp in imports_of(module):
            if imp.name.split(".")[0] in forbidden:
                wrong.append(f"{path.relative_to(ROOT)}:{imp.line} imports {imp.name}")
    assert not wrong, "imports against the floor plan:\n" + "\n".join(wrong)


def test_the_checks_see_what_they_look_for(tmp_path):
    """The walk's own parts on a known graph and known source: a cycle, a type-only import, a relative one."""
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert one_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nelse:\n    import y\n"
                     "def f():\n    import z\n")
    assert [alias.name for node in _import_nodes(tree) for alias in node.names] == ["TYPE_CHECKING", "y", "z"]
    assert "benchmarks.results_writer" in import_graph()["benchmarks.cli"]  # `from .results_writer import ...`
    assert [name for name, _ in _functions(ast.parse("class A:\n    def m(self):\n        def inner():\n"
                                                    "            pass\n"))] == ["A.m", "A.m.inner"]

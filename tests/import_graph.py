"""The import graph of ``lmscale/`` and ``launcher/``, read from the source: every import statement, those inside
functions included, as an edge from its module to the project module it names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("lmscale", "launcher")


def module_name(repo: Path, path: Path) -> str:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every dotted name an import statement may refer to: a module, or a module's attribute."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def import_graph(repo: Path) -> dict[str, set[str]]:
    paths = {module_name(repo, p): p for package in PACKAGES for p in (repo / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = imported_names(node, module, path.name == "__init__.py")
            # `from a import b` names the module a.b when there is one, else an attribute of a.
            hit = next((name for name in names if name in paths), None)
            if hit is not None:
                targets.add(hit)
        graph[module] = targets - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def importers_of(repo: Path, top_level: str) -> set[str]:
    """The project's modules that import ``top_level`` (or a module under it) anywhere in their source."""
    found = set()
    for package in PACKAGES:
        for path in (repo / package).rglob("*.py"):
            module = module_name(repo, path)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = imported_names(node, module, path.name == "__init__.py")
                if any(name == top_level or name.startswith(top_level + ".") for name in names):
                    found.add(path.relative_to(repo).as_posix())
    return found

"""The architecture of the package, checked: layers, no import cycles, private names kept private.

The layering is the ``[tool.importlinter]`` contracts in ``pyproject.toml`` (run here, and by
``lint-imports`` from the repository root). The rest reads the source files of this checkout:
the import graph through ``grimp``, names and sizes through ``ast``. Only the TypedFile size
check imports ``pipeline``; nothing opens a bank or starts a cluster.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import itertools
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "features")  # h5bank's own top-level packages
SCANNED = (*PACKAGES, "tests", "benchmarks")  # where private names must not be reached into
CLASS_LINES = 330  # "no class over about 300" (the architecture issue), as end_lineno - lineno
TYPEDFILE_LINES = 400  # the module defining TypedFile has fewer lines than this
SHOWN_IMPORTS = 25  # the most imports a cycle's report lists beyond its shortest circle


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(REPO)}:{line}"


def module_name(path: Path) -> str | None:
    """The dotted name of a file of ``pipeline`` or ``features``; None for other files."""
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[0] not in PACKAGES:
        return None
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def from_this_checkout(package: str) -> None:
    """Fail unless ``import package`` finds this checkout's files (what grimp and inspect read)."""
    spec = importlib.util.find_spec(package)
    origin = Path(spec.origin).resolve() if spec and spec.origin else None
    assert origin is not None and origin.is_relative_to(REPO), (
        f"{package} is imported from {origin}, not from this checkout {REPO}: run "
        "`python -m pytest` from the checkout, or install it with `pip install -e .`"
    )


def is_package(name: str) -> bool:
    return (REPO.joinpath(*name.split(".")) / "__init__.py").is_file()


def is_module(name: str) -> bool:
    """Whether a dotted name is a module or package of this checkout (by its file)."""
    if name.split(".")[0] not in PACKAGES:
        return False
    return is_package(name) or REPO.joinpath(*name.split(".")).with_suffix(".py").is_file()


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_within(importer: str | None, package: str) -> bool:
    return importer is not None and (importer == package or importer.startswith(package + "."))


def absolute(node: ast.ImportFrom, importer: str | None, path: Path) -> str | None:
    """The module a ``from ... import`` reads from, relative imports resolved; None if unknown."""
    if not node.level:
        return node.module
    if importer is None:  # a relative import in tests/ or benchmarks/: not h5bank's
        return None
    base = importer.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    if not base:
        return None
    return ".".join([*base, node.module] if node.module else base)


def crossing(importer: str | None, dotted: str) -> str | None:
    """The private part of a reference to ``dotted`` that ``importer`` may not reach, if any.

    A private attribute ``m._y`` belongs to module ``m`` alone; a private submodule
    ``p._m`` belongs to package ``p``, so modules inside ``p`` may use it. Code outside
    ``pipeline`` and ``features`` (``importer`` None) may use neither.
    """
    parts = dotted.split(".")
    for i in range(1, len(parts)):
        if not is_private(parts[i]):
            continue
        owner, target = ".".join(parts[:i]), ".".join(parts[: i + 1])
        allowed = is_within(importer, owner) if is_module(target) else importer == owner
        return None if allowed else target
    return None


# -- the checks -----------------------------------------------------------------------------


def test_import_contracts_are_kept():
    """The ``[tool.importlinter]`` contracts in pyproject.toml are kept.

    ``pipeline`` is layered (each module imports only the layers listed below its own, and the
    modules of one ``a | b`` layer do not import each other), and ``features`` imports nothing
    from ``pipeline``. A missing layer that is not marked optional ``(name)`` fails too.
    The linter runs in a process of its own, on this checkout (its current directory).
    """
    code = "from importlinter.cli import lint_imports_command as c; c(prog_name='lint-imports')"
    config = str(REPO / "pyproject.toml")
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-c", code, "--no-cache", "--no-logo", config],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    report = f"lint-imports exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    if result.returncode != 0 or not re.search(
        r"Contracts: [1-9][0-9]* kept, 0 broken", result.stdout
    ):
        pytest.fail(report, pytrace=False)


def cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """The groups of modules that import each other in a circle (strongly connected, 2 or more)."""
    imports = {m: sorted(graph.find_modules_directly_imported_by(m) & modules) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(start: str) -> None:  # Tarjan, iterative (no recursion limit on deep chains)
        work: list[tuple[str, Iterator[str]]] = [(start, iter(imports[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            module, todo = work[-1]
            for imported in todo:
                if imported not in index:
                    index[imported] = low[imported] = len(index)
                    stack.append(imported)
                    on_stack.add(imported)
                    work.append((imported, iter(imports[imported])))
                    break
                if imported in on_stack:
                    low[module] = min(low[module], index[imported])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[module])
                if low[module] == index[module]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == module:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return sorted(groups)


def import_lines(graph: grimp.ImportGraph, importer: str, imported: str) -> str:
    details = graph.get_import_details(importer=importer, imported=imported)
    lines = "; ".join(f"line {d['line_number']}: {d['line_contents']}" for d in details)
    return f"{importer} -> {imported} ({lines or 'line unknown'})"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
    """No module of ``pipeline`` (or of ``features``) imports, directly or through others, itself.

    Every import counts, wherever it is: at the top, inside a function (a "lazy" import
    that hides a cycle at import time), under ``if TYPE_CHECKING:`` (as in the layers contract).
    Each group of modules in a cycle is reported as one shortest circle through it, then (up to
    25 of) all the imports within the group, with line numbers.
    """
    from_this_checkout(package)
    graph = grimp.build_graph(package, cache_dir=None)
    modules = {m for m in graph.modules if m == package or m.startswith(package + ".")}
    reports = []
    for group in cycles(graph, modules):
        members = set(group)
        first = group[0]
        second = sorted(graph.find_modules_directly_imported_by(first) & members)[0]
        back = graph.find_shortest_chain(importer=second, imported=first) or (second, first)
        circle = [first, *back]
        steps = [import_lines(graph, a, b) for a, b in itertools.pairwise(circle)]
        within = [
            import_lines(graph, a, b)
            for a in group
            for b in sorted(graph.find_modules_directly_imported_by(a) & members)
        ]
        report = f"cycle among {', '.join(group)}:\n  " + " ->\n  ".join(steps)
        if len(within) > len(steps):  # more imports tie the group than the one circle shows
            shown = within[:SHOWN_IMPORTS]
            if len(within) > len(shown):
                shown.append(f"... and {len(within) - len(shown)} more")
            report += f"\n  {len(within)} imports within this group:\n    " + "\n    ".join(shown)
        reports.append(report)
    if reports:
        pytest.fail(
            f"{len(reports)} import cycle(s) in {package}:\n" + "\n".join(reports), pytrace=False
        )


def private_references(path: Path) -> Iterator[tuple[int, str]]:
    """(line, what) for each private name of another h5bank module the file reaches."""
    importer = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bound: dict[str, str] = {}  # local name -> the h5bank module or name it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in PACKAGES:
                    continue
                if (target := crossing(importer, alias.name)) is not None:
                    yield node.lineno, f"import {alias.name} (private: {target})"
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node, importer, path)
            if source is None or source.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                if alias.name == "*":
                    continue
                name = f"{source}.{alias.name}"
                if (target := crossing(importer, name)) is not None:
                    yield node.lineno, f"from {source} import {alias.name} (private: {target})"
                bound[alias.asname or alias.name] = name

    def module_of(node: ast.expr) -> str | None:
        """The h5bank module an expression names (``layout``, ``pipeline.format.layout``)."""
        if isinstance(node, ast.Name):
            name = bound.get(node.id)
        elif isinstance(node, ast.Attribute):
            parent = module_of(node.value)
            name = f"{parent}.{node.attr}" if parent else None
        else:
            return None
        return name if name and is_module(name) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            module = module_of(node.value)
            if module and (target := crossing(importer, f"{module}.{node.attr}")):
                yield node.lineno, f"{ast.unparse(node)} (private: {target})"
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            # getattr(module, "_y"), monkeypatch.setattr(module, "_y", ...), hasattr, delattr
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            name = node.args[1]
            if (
                called in {"getattr", "setattr", "delattr", "hasattr"}
                and isinstance(name, ast.Constant)
                and isinstance(name.value, str)
                and (module := module_of(node.args[0]))
                and (target := crossing(importer, f"{module}.{name.value}"))
            ):
                yield node.lineno, f"{ast.unparse(node)[:100]} (private: {target})"
        if isinstance(node, ast.Call) and node.args:
            # monkeypatch.setattr("pipeline.x._y", ...), mock.patch("pipeline.x._y")
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            text = node.args[0]
            if (
                called in {"setattr", "delattr", "patch"}
                and isinstance(text, ast.Constant)
                and isinstance(text.value, str)
                and text.value.split(".")[0] in PACKAGES
                and (target := crossing(importer, text.value))
            ):
                yield node.lineno, f"{ast.unparse(node)[:100]} (private: {target})"


def test_no_private_names_reached_across_modules():
    """No file of pipeline/, features/, tests/ or benchmarks/ uses another h5bank module's privates.

    Neither ``from pipeline.x import _y`` nor ``module._y`` (``getattr(module, "_y")``,
    ``monkeypatch.setattr(module, "_y", ...)``) where ``module`` is an imported ``pipeline`` or
    ``features`` module; a private submodule ``pipeline.p._m`` only from inside ``pipeline.p``.
    A name that code elsewhere needs is public API: rename it. Dunders (``__version__``) are fine.
    """
    found = [
        f"{where(path, line)}: {what}"
        for path in python_files(*SCANNED)
        for line, what in sorted(set(private_references(path)))
    ]
    if found:
        pytest.fail("private names used outside their module:\n" + "\n".join(found), pytrace=False)


def test_features_imports_nothing_from_pipeline():
    """``features`` stands alone: none of its files imports ``pipeline`` (anywhere in a file).

    The forbidden contract checks this too; this says which line, and sees
    ``importlib.import_module("pipeline...")`` as well.
    """
    found = []
    for path in python_files("features"):
        importer = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [absolute(node, importer, path) or ""]
            elif (
                isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            ):
                func = node.func
                called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                text = node.args[0].value
                dynamic = called in {"import_module", "__import__"} and isinstance(text, str)
                names = [text] if dynamic else []
            else:
                continue
            found += [
                f"{where(path, node.lineno)}: {ast.unparse(node)}"
                for name in names
                if name.split(".")[0] == "pipeline"
            ]
    if found:
        pytest.fail("features imports pipeline:\n" + "\n".join(found), pytrace=False)


def test_typedfile_module_is_small():
    """The module defining ``TypedFile`` (found by import) has fewer than 400 lines.

    The rest of what a bank does lives in the modules of its package, not in one file.
    """
    from_this_checkout("pipeline")
    import pipeline

    source = Path(inspect.getsourcefile(pipeline.TypedFile)).resolve()
    lines = len(source.read_text(encoding="utf-8").splitlines())
    assert lines < TYPEDFILE_LINES, (
        f"{source.relative_to(REPO)} (defines TypedFile) has {lines} lines; "
        f"the limit is {TYPEDFILE_LINES - 1}"
    )


def test_no_class_is_longer_than_about_300_lines():
    """No class in ``pipeline`` or ``features`` spans more than CLASS_LINES (nested ones included)."""
    found = [
        f"{where(path, node.lineno)}: class {node.name} spans {node.end_lineno - node.lineno} lines"
        for path in python_files(*PACKAGES)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno > CLASS_LINES
    ]
    if found:
        pytest.fail(f"classes longer than {CLASS_LINES} lines:\n" + "\n".join(found), pytrace=False)

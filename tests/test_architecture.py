"""The package's shape: no import circle among zeroloop's modules, and modules of a readable size.

Read from the source with ``ast``: nothing is imported.
"""

import ast
from pathlib import Path

import zeroloop

PACKAGE = "zeroloop"
PACKAGE_DIR = Path(zeroloop.__file__).parent
MAX_MODULE_LINES = 650  # one idea per module; past this a module holds several


def module_files() -> list[Path]:
    """Every module of the package, its sub-packages' included."""
    return sorted(PACKAGE_DIR.rglob("*.py"))


def module_name(path: Path) -> str:
    """The dotted name: ``zeroloop`` for the package's ``__init__.py``, ``zeroloop.memory`` for
    a sub-package's, ``zeroloop.memory.probes`` for a module."""
    parts = (PACKAGE,) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements run when the module is imported: those at the top level and in
    top-level ``if``/``try``/``with`` blocks, not those in functions, classes or under
    ``if TYPE_CHECKING``."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            pending.extend(node.orelse if is_type_checking(node) else node.body + node.orelse)
        elif isinstance(node, ast.Try):
            pending.extend(node.body + node.orelse + node.finalbody +
                           [child for handler in node.handlers for child in handler.body])
        elif isinstance(node, ast.With):
            pending.extend(node.body)
    return found


def every_import(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, those run later (inside functions) included; not those under
    ``if TYPE_CHECKING``, which never run."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and is_type_checking(node):
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))
    return found


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, modules: set[str],
                     packages: set[str] = frozenset({PACKAGE})) -> set[str]:
    """The package's modules an import statement of ``importer`` loads.

    ``from .x import y`` and ``from zeroloop.x import y`` load ``zeroloop.x``; ``from . import x``
    loads ``zeroloop.x`` when x is a module, else needs the package's ``__init__`` to have
    defined x; ``import zeroloop.x`` loads ``zeroloop.x``.
    """
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:  # relative to the importer's package, one level up per extra dot
            package = importer if importer in packages else importer.rsplit(".", 1)[0]
            package = ".".join(package.split(".")[:len(package.split(".")) - (node.level - 1)])
            base = ".".join([package] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        # Each name is a module of its own, or a name the base module must have defined.
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    loaded = set()
    for target in targets:
        if target.split(".")[0] != PACKAGE:
            continue
        while target not in modules and "." in target:  # a name inside a module: the module
            target = target.rsplit(".", 1)[0]
        if target in modules:
            loaded.add(target)
    loaded.discard(importer)
    return loaded


def import_graph(sources: dict[str, str], packages: set[str] = frozenset({PACKAGE}),
                 deferred: bool = False) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports at module level (with ``deferred``,
    also inside functions).

    Args:
        sources: each module's text, by dotted name.
        packages: the names that are packages (``__init__.py``), for relative imports.
        deferred: count the imports inside functions too.
    """
    modules = set(sources)
    statements = every_import if deferred else module_level_imports
    return {name: set().union(*(imported_modules(node, name, modules, packages)
                                for node in statements(ast.parse(source))))
            for name, source in sources.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each group of modules that import each other (Tarjan's strongly
    connected components), as ``[a, b, ..., a]``."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph.get(node, ())):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [circle_within(graph, component) for component in components]


def circle_within(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for child in sorted(graph[path[-1]] & component):
            if child == start:
                return path + [start]
            if child not in seen:
                seen.add(child)
                paths.append(path + [child])
    raise AssertionError(f"no circle in {component}")  # a strongly connected component has one


def package_sources() -> dict[str, str]:
    return {module_name(path): path.read_text() for path in module_files()}


def package_names() -> set[str]:
    return {module_name(path) for path in module_files() if path.stem == "__init__"}


def test_no_import_circle_among_the_modules():
    graph = import_graph(package_sources(), package_names())
    assert len(graph) > 10 and graph["zeroloop"]  # the package was read, and __init__ imports modules
    cycles = import_cycles(graph)
    assert not cycles, "import circles at module level:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_circle_hidden_in_a_function_either():
    """An import inside a function only postpones a circle: the two modules still cannot be
    read, changed or tested apart."""
    graph = import_graph(package_sources(), package_names(), deferred=True)
    cycles = import_cycles(graph)
    assert not cycles, "import circles through deferred imports:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_circle_check_finds_a_circle_and_ignores_deferred_imports():
    sources = {
        "zeroloop": "from .loop import TrainerLoop\n",
        "zeroloop.loop": "from . import checkpoint\nimport torch\n",
        "zeroloop.checkpoint": "from zeroloop.consolidate import export\n",
        "zeroloop.consolidate": ("from typing import TYPE_CHECKING\n"
                                 "from .memory import parse_size\n"
                                 "if TYPE_CHECKING:\n    from .loop import TrainerLoop\n"
                                 "def later():\n    from .checkpoint import LATEST\n"),
        "zeroloop.memory": "import zeroloop.loop\n",
    }
    graph = import_graph(sources)
    assert graph == {"zeroloop": {"zeroloop.loop"}, "zeroloop.loop": {"zeroloop.checkpoint"},
                     "zeroloop.checkpoint": {"zeroloop.consolidate"}, "zeroloop.consolidate": {"zeroloop.memory"},
                     "zeroloop.memory": {"zeroloop.loop"}}
    assert import_cycles(graph) == [["zeroloop.checkpoint", "zeroloop.consolidate", "zeroloop.memory",
                                     "zeroloop.loop", "zeroloop.checkpoint"]]
    sources["zeroloop.memory"] = "import json\n"
    assert import_cycles(import_graph(sources)) == []
    assert import_cycles(import_graph(sources, deferred=True)) == [["zeroloop.checkpoint", "zeroloop.consolidate",
                                                                    "zeroloop.checkpoint"]]


def test_relative_imports_inside_a_sub_package():
    sources = {"zeroloop": "from .memory import plan\n",
               "zeroloop.memory": "from .probes import available_ram\nfrom ..sizes import parse_size\n",
               "zeroloop.memory.probes": "from . import render\nfrom .. import sizes\n",
               "zeroloop.memory.render": "", "zeroloop.sizes": ""}
    assert import_graph(sources, {"zeroloop", "zeroloop.memory"}) == {
        "zeroloop": {"zeroloop.memory"}, "zeroloop.memory": {"zeroloop.memory.probes", "zeroloop.sizes"},
        "zeroloop.memory.probes": {"zeroloop.memory.render", "zeroloop.sizes"}, "zeroloop.memory.render": set(),
        "zeroloop.sizes": set()}


def test_every_module_is_at_most_650_lines():
    lengths = {str(path.relative_to(PACKAGE_DIR)): len(path.read_text().splitlines()) for path in module_files()}
    too_long = {name: lines for name, lines in lengths.items() if lines > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them by concern): {too_long}"

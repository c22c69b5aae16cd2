"""The package's shape: no import circle among zeroloop's modules, and modules of a readable size.

Read from the source with ``ast``: nothing is imported.
"""

import ast
from pathlib import Path

import zeroloop

PACKAGE = "zeroloop"
PACKAGE_DIR = Path(zeroloop.__file__).parent
MAX_MODULE_LINES = 650  # one idea per module; past this a module holds several


def module_name(path: Path) -> str:
    """``zeroloop`` for the package's ``__init__.py``, else ``zeroloop.<stem>``."""
    return PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"


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


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, modules: set[str]) -> set[str]:
    """The package's modules an import statement of ``importer`` loads.

    ``from .x import y`` and ``from zeroloop.x import y`` load ``zeroloop.x``; ``from . import x``
    loads ``zeroloop.x`` when x is a module, else needs the package's ``__init__`` to have
    defined x; ``import zeroloop.x`` loads ``zeroloop.x``.
    """
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            package = importer if importer == PACKAGE else importer.rsplit(".", 1)[0]
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


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports at module level."""
    modules = set(sources)
    return {name: set().union(*(imported_modules(node, name, modules)
                                for node in module_level_imports(ast.parse(source))))
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
    return {module_name(path): path.read_text() for path in sorted(PACKAGE_DIR.glob("*.py"))}


def test_no_import_circle_among_the_modules():
    graph = import_graph(package_sources())
    assert len(graph) > 10 and graph["zeroloop"]  # the package was read, and __init__ imports modules
    cycles = import_cycles(graph)
    assert not cycles, "import circles at module level:\n" + "\n".join(" -> ".join(c) for c in cycles)


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


def test_every_module_is_at_most_650_lines():
    lengths = {path.name: len(path.read_text().splitlines()) for path in sorted(PACKAGE_DIR.glob("*.py"))}
    too_long = {name: lines for name, lines in lengths.items() if lines > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them by concern): {too_long}"

"""The reference loop every parity test compares TrainerLoop against shares no code with zeroloop.

``zeroloop.testing.engine_loop`` stands for the loop users write by hand. Were it to call one of
the library's helpers (moving batches, extracting the loss, choosing the compute dtype...), a bug
in that helper would show on both sides of a comparison and every parity test would still pass.
Read from the source with ``ast``: nothing is imported or run.
"""

import ast
from pathlib import Path

import zeroloop.testing

REFERENCE_ENTRY = "engine_loop"


def module_definitions(tree: ast.Module) -> dict[str, ast.AST]:
    """Module-level functions, classes and assigned names, by name."""
    definitions = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            definitions[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        definitions[name.id] = node
    return definitions


def is_zeroloop_import(node: ast.AST) -> bool:
    """``from .x import``, ``from zeroloop[.x] import`` or ``import zeroloop[.x]``."""
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "zeroloop"
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] == "zeroloop" for alias in node.names)
    return False


def zeroloop_names(tree: ast.Module) -> dict[str, str]:
    """Names the module binds at module level from zeroloop, with the import that binds them."""
    names = {}
    for node in tree.body:
        if is_zeroloop_import(node):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                names[bound] = ast.unparse(node)
    return names


def reference_closure(tree: ast.Module, entry: str) -> dict[str, ast.AST]:
    """``entry`` and every module-level definition it references, transitively."""
    definitions = module_definitions(tree)
    reached, pending = {}, [entry]
    while pending:
        name = pending.pop()
        if name in reached or name not in definitions:
            continue
        reached[name] = definitions[name]
        pending.extend(node.id for node in ast.walk(definitions[name]) if isinstance(node, ast.Name))
    return reached


def shared_with_zeroloop(source: str, entry: str = REFERENCE_ENTRY) -> list[str]:
    """Every place where the reference loop's code reaches into zeroloop, as readable lines.

    Args:
        source: the text of the module that defines the reference loop.
        entry: the reference loop's function.

    Returns:
        ``"<function>: <name> (<import>)"`` for each zeroloop name used, and
        ``"<function>: <import>"`` for each import of zeroloop inside the functions.
    """
    tree = ast.parse(source)
    imported = zeroloop_names(tree)
    found = []
    for name, definition in reference_closure(tree, entry).items():
        for node in ast.walk(definition):
            if isinstance(node, ast.Name) and node.id in imported:
                found.append(f"{name}: {node.id} ({imported[node.id]})")
            elif is_zeroloop_import(node):
                found.append(f"{name}: {ast.unparse(node)}")
    return sorted(set(found))


def test_the_reference_loop_uses_torch_and_deepspeed_only():
    source = Path(zeroloop.testing.__file__).read_text()
    reached = reference_closure(ast.parse(source), REFERENCE_ENTRY)
    assert REFERENCE_ENTRY in reached and len(reached) > 1  # the walk found the loop and its helpers
    shared = shared_with_zeroloop(source)
    assert shared == [], f"the reference loop must not share code with the library it checks: {shared}"


def test_a_helper_reached_through_another_function_is_caught():
    """The check can fail: the loop calls a module-level helper that uses a zeroloop function;
    the library's other functions may use it."""
    source = '''
import torch
from .data import move_to_device
from .runtime import log

def engine_loop(model, batch):
    return helper(model, batch)

def helper(model, batch):
    return model(**move_to_device(batch, torch.device("cpu")))

def unrelated():
    log("the library's own code may use it")
'''
    assert shared_with_zeroloop(source) == ["helper: move_to_device (from .data import move_to_device)"]


def test_a_zeroloop_module_or_an_import_inside_the_loop_is_caught():
    source = '''
import zeroloop.loop

def engine_loop(model, batch):
    from zeroloop.data import move_to_device
    return zeroloop.loop.loss_from_output(model(**move_to_device(batch, None)))
'''
    assert shared_with_zeroloop(source) == ["engine_loop: from zeroloop.data import move_to_device",
                                            "engine_loop: zeroloop (import zeroloop.loop)"]

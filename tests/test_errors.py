"""One error hierarchy: every exception zeroloop defines lives in zeroloop.errors, under
ZeroloopError, and subclasses the builtin its callers catch."""

import ast
from pathlib import Path

import pytest

import zeroloop
from zeroloop import CheckpointError, ConfigError, ZeroloopError, consolidate, errors
from zeroloop.checkpoint import find_checkpoint

PACKAGE = Path(zeroloop.__file__).parent


def exception_classes_defined_outside_errors():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):  # subpackages (zeroloop.memory) too
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if name == "errors":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(base, "id", "").endswith(("Error", "Exception", "Failure", "Timeout"))
                    for base in node.bases):
                found.append(f"{name}.{node.name}")
    return found


def test_every_exception_class_is_defined_in_zeroloop_errors():
    assert exception_classes_defined_outside_errors() == []


def test_every_error_is_a_zeroloop_error_and_the_builtin_callers_catch():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), ZeroloopError), name
    assert issubclass(ConfigError, ValueError)
    assert issubclass(CheckpointError, RuntimeError) and issubclass(CheckpointError, ValueError)
    assert issubclass(errors.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(errors.NumericalHealthError, RuntimeError)
    assert issubclass(errors.RankTimeout, errors.RankFailure)


def test_one_checkpoint_error_catches_resume_and_consolidation_problems(tmp_path):
    with pytest.raises(zeroloop.CheckpointError, match="no such file or folder"):
        find_checkpoint(str(tmp_path / "gone"), str(tmp_path))
    with pytest.raises(zeroloop.CheckpointError, match="gone"):
        consolidate(tmp_path / "gone", tmp_path / "out")


def test_config_error_lists_every_problem():
    error = ConfigError(["a: must be 1", "b: must be 2"], source="ds.json")
    assert error.problems == ["a: must be 1", "b: must be 2"]
    assert str(error) == "DeepSpeed config (ds.json) has 2 problems:\n  - a: must be 1\n  - b: must be 2"

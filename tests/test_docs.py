"""The docs stay true: every name in docs/api.md exists, and the Python blocks of the README
and the quickstart run.

A ```python block preceded by ``<!-- not-run -->`` is an excerpt (it uses names it does not
define) and is skipped; every other block must run as a script, alone, in a temp directory.
"""

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import zeroloop
import zeroloop.testing

ROOT = Path(__file__).resolve().parent.parent
RUNNABLE_DOCS = ("README.md", "docs/quickstart.md")
NOT_RUN = "<!-- not-run -->"
TIMEOUT_S = 240
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.S)
API_HEADING = re.compile(r"^### (zeroloop(?:\.\w+)+)\s*$", re.M)


def documented_names():
    return API_HEADING.findall((ROOT / "docs" / "api.md").read_text())


def resolve(dotted: str):
    """The object a dotted name refers to: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def resolve_attribute(dotted: str):
    """Like :func:`resolve`, but attributes first: a name a package exports wins over a
    submodule of the same name."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, attr in enumerate(parts[1:], 1):
        if not hasattr(obj, attr):
            importlib.import_module(".".join(parts[:i + 1]))
        obj = getattr(obj, attr)
    return obj


def documented_signatures():
    """(dotted name, documented signature) of every API entry whose text opens with a call
    signature in backticks, such as `plan(model=None, *, params=None, ...) -> Plan`."""
    text = (ROOT / "docs" / "api.md").read_text()
    found = []
    headings = list(API_HEADING.finditer(text))
    for heading, following in zip(headings, headings[1:] + [None]):
        name = heading.group(1)
        section = text[heading.end():following.start() if following else len(text)]
        short = re.escape(name.rsplit(".", 1)[1])
        match = re.search(rf"`(?:with )?({short}\((?P<params>[^`]*?)\))(?: -> [^`]+)?:?`", section, re.S)
        if match:
            found.append(pytest.param(name, " ".join(match.group("params").split()), id=name))
    return found


def documented_parameters(params: str) -> tuple[list[tuple[str, str, str | None]], bool]:
    """``([(name, kind, default source)], elided)`` of a documented parameter list; ``...``
    marks parameters left out (then only the order and the listed ones are checked)."""
    elided = "..." in params
    params = ", ".join(p for p in (p.strip() for p in params.split(",")) if p != "...")
    args = ast.parse(f"def f({params}): pass").body[0].args
    listed = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for arg, default in zip(positional, defaults):
        listed.append((arg.arg, "positional", ast.unparse(default) if default else None))
    if args.vararg:
        listed.append((args.vararg.arg, "*args", None))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        listed.append((arg.arg, "keyword", ast.unparse(default) if default else None))
    if args.kwarg:
        listed.append((args.kwarg.arg, "**kwargs", None))
    return listed, elided


def actual_parameters(obj) -> list[tuple[str, str, object]]:
    kinds = {inspect.Parameter.POSITIONAL_ONLY: "positional", inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
             inspect.Parameter.VAR_POSITIONAL: "*args", inspect.Parameter.KEYWORD_ONLY: "keyword",
             inspect.Parameter.VAR_KEYWORD: "**kwargs"}
    return [(p.name, kinds[p.kind], p.default) for p in inspect.signature(obj).parameters.values()]


def python_blocks():
    """(doc, index, code) of every ```python block not marked not-run."""
    found = []
    for doc in RUNNABLE_DOCS:
        text = "\n" + (ROOT / doc).read_text()
        blocks = [m for m in BLOCK.finditer(text) if m.group("before").strip() != NOT_RUN]
        found += [pytest.param(m.group("code"), id=f"{doc}#{i}") for i, m in enumerate(blocks)]
    return found


@pytest.mark.parametrize("name", documented_names())
def test_documented_name_exists(name):
    resolve(name)


def test_api_reference_covers_the_public_api():
    documented = set(documented_names())
    missing = [f"zeroloop.{n}" for n in zeroloop.__all__ if f"zeroloop.{n}" not in documented]
    public_testing = ("run_ranks", "RankFailure", "RankTimeout", "single_process", "fp16_on_cpu",
                      "tiny_config", "full_parameters", "engine_loop", "EngineLoopResult",
                      "assert_matches_engine_loop", "remove_shm_buffers", "choose_rank_device", "RankDevice",
                      "RankResults")
    missing += [f"zeroloop.testing.{n}" for n in public_testing if f"zeroloop.testing.{n}" not in documented]
    assert not missing, f"public names missing from docs/api.md: {missing}"


@pytest.mark.parametrize("name, params", documented_signatures())
def test_documented_signature_matches_the_code(name, params):
    documented, elided = documented_parameters(params)
    actual = actual_parameters(resolve_attribute(name))
    names = [n for n, _, _ in actual]
    assert [n for n, _, _ in documented] == [n for n in names if n in {d for d, _, _ in documented}], \
        f"{name}: documented parameters out of order or unknown: {[n for n, _, _ in documented]} vs {names}"
    if not elided:
        assert len(documented) == len(actual), f"{name}: documented {[n for n, _, _ in documented]}, code {names}"
    by_name = {n: (kind, default) for n, kind, default in actual}
    for param, kind, default_source in documented:
        actual_kind, actual_default = by_name[param]
        assert kind == actual_kind, f"{name}: {param} is {actual_kind} in the code, documented {kind}"
        if actual_default is inspect.Parameter.empty:
            assert default_source is None, f"{name}: {param} has no default in the code, documented {default_source}"
        else:
            assert default_source is not None, f"{name}: {param} defaults to {actual_default!r} in the code"
            assert ast.literal_eval(default_source) == actual_default, \
                f"{name}: {param} defaults to {actual_default!r} in the code, documented {default_source}"


def test_signatures_are_found():
    assert len(documented_signatures()) >= 20, "the signature extraction is broken"


def test_runnable_blocks_are_found():
    assert python_blocks(), "no runnable ```python block found: the extraction is broken"


@pytest.mark.launcher
@pytest.mark.parametrize("code", python_blocks())
def test_doc_block_runs(code, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(code + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=TIMEOUT_S, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

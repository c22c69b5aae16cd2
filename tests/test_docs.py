"""The docs stay true: every name in docs/api.md exists, and the Python blocks of the README
and the quickstart run.

A ```python block preceded by ``<!-- not-run -->`` is an excerpt (it uses names it does not
define) and is skipped; every other block must run as a script, alone, in a temp directory.
"""

import importlib
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

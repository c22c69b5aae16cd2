import os

import pytest

# One JIT build of DeepSpeed's C++ ops for the whole session (and across sessions): every
# rank process inherits this directory.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/zeroloop/torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _no_leaked_shm_buffers():
    """Every test must leave /dev/shm as it found it (each leaked buffer is 66 MiB of RAM)."""
    before = set(_shm_buffers())
    yield
    leaked = set(_shm_buffers()) - before
    assert not leaked, f"test left DeepSpeed buffers in /dev/shm: {sorted(leaked)}"


def _shm_buffers():
    try:
        return [f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer")]
    except FileNotFoundError:
        return []

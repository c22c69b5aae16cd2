import logging
import os

import pytest

# DeepSpeed JIT-builds the C++ ops some tests use (CPU FusedAdam) into torch's cache:
# TORCH_EXTENSIONS_DIR when set, else ~/.cache/torch_extensions, the cache every other run
# on the machine (the README's main job included) uses too, so nothing is built twice.
# No DS_ACCELERATOR here: the suite runs on DeepSpeed's own choice (the GPU when there is
# one); multi-rank tests run CPU ranks with gloo when there are fewer GPUs than ranks
# (zeroloop.testing.choose_rank_device). DS_ACCELERATOR=cpu keeps everything on the CPU.


@pytest.fixture(autouse=True)
def _no_leaked_shm_buffers():
    """Every test must leave /dev/shm as it found it (each leaked buffer is 66 MiB of RAM).

    Set ZEROLOOP_OTHER_DEEPSPEED_JOBS=1 when other DeepSpeed jobs on the machine may
    create buffers while the tests run; CI runs alone and checks.
    """
    if os.environ.get("ZEROLOOP_OTHER_DEEPSPEED_JOBS") == "1":
        yield
        return
    before = set(_shm_buffers())
    yield
    leaked = set(_shm_buffers()) - before
    assert not leaked, f"test left DeepSpeed buffers in /dev/shm: {sorted(leaked)}"


def _shm_buffers():
    try:
        return [f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer")]
    except FileNotFoundError:
        return []


@pytest.fixture(autouse=True)
def _zeroloop_logs_reach_caplog():
    """zeroloop's logger prints through its own handler and does not propagate; let pytest's
    caplog (on the root logger) see it too during tests."""
    logger = logging.getLogger("zeroloop")
    propagate, logger.propagate = logger.propagate, True
    yield
    logger.propagate = propagate

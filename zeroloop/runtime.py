"""The process around DeepSpeed: rank environment, CPU threads, seeding and a clean exit.

DeepSpeed owns the engine and the process group; this module only prepares the process
before ``deepspeed.initialize`` and takes it down afterwards so that every rank exits 0.
"""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import os
import random
import socket
import time

import numpy as np
import torch

from .launcher import watch_launcher

log = logging.getLogger("zeroloop")
if not log.handlers:  # visible by default, like DeepSpeed's own logger; silence with setLevel
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[zeroloop] %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False

SHM_PREFIX = "/dev/shm/deepspeed_allreduce_buffer"
# Seconds to let gloo's worker threads drop their last tensors before the interpreter
# finalizes; without it 2-rank CPU runs abort with "terminate called without an active
# exception" in 10-35% of exits (a gloo thread needs the GIL during finalization).
EXIT_PAUSE_S = 0.1


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_rank_env() -> bool:
    """Fill in the rank variables a launcher would set, for a plain ``python`` run.

    Returns:
        True if this is a single process started without a launcher (the variables
        were missing and are now set for one rank).

    Raises:
        RuntimeError: a multi-rank run (WORLD_SIZE > 1) is missing MASTER_ADDR/PORT,
            which cannot be guessed.
    """
    standalone = "WORLD_SIZE" not in os.environ and "RANK" not in os.environ
    env = os.environ
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", env["RANK"] if env["WORLD_SIZE"] == "1" else "0")
    if int(env["WORLD_SIZE"]) > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: start the script "
                           "with `deepspeed --num_gpus N script.py` or `torchrun --nproc_per_node N "
                           "script.py`, which set them")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    return standalone


def init_distributed() -> bool:
    """Start the process group the way ``TrainerLoop`` does, for scripts that want to keep it.

    Fills in the rank variables of a plain ``python`` run, splits the CPU threads between
    local ranks, registers the exit pause, calls ``deepspeed.init_distributed()``, unlinks
    this rank's /dev/shm buffer (:func:`release_shm_buffer`), so that no failure later in
    the run can leave it behind, and starts watching the launcher
    (:func:`zeroloop.launcher.watch_launcher`), so that no rank outlives it. A loop started
    afterwards reuses the group and leaves it up; end it with :func:`teardown` (``engine=None``).

    Returns:
        True if this call started the group, False if it already existed.
    """
    import deepspeed
    import deepspeed.comm as dist

    from .ops import clear_stale_build_locks, skip_unused_builds

    ensure_rank_env()
    set_cpu_threads()
    register_exit_pause()
    cache_cpu_info()
    started = not dist.is_initialized()
    if started and local_rank() == 0:
        clear_stale_build_locks()  # else a lock left by a killed build makes the ops' loads wait forever
    skip_unused_builds()  # the CPU shm all-reduce op: a minute of compiling that training never uses
    deepspeed.init_distributed()
    release_shm_buffer()
    watch_launcher()
    return started


def cache_cpu_info() -> None:
    """Keep py-cpuinfo's first answer for the rest of the process.

    DeepSpeed's op builders ask ``cpuinfo.get_cpu_info()`` twice per ``deepspeed.initialize``
    and each call starts a subprocess: 1.13 s each here, 40% of a warm one-rank 2-step run.
    The CPU does not change while the process runs.
    """
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed falls back to lscpu
        return
    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This rank's index on its machine (set by every launcher)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    """Ranks on this machine, from whichever launcher started us."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):  # torchrun, deepspeed
        if key in os.environ:
            return int(os.environ[key])
    return world_size()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_cpu_threads() -> int | None:
    """Give each local rank its share of the cores when ``OMP_NUM_THREADS`` is unset.

    The ``deepspeed`` launcher leaves it unset, and 2 ranks each using every core of a
    2-core machine ran ZeRO-0 at 1.34 steps/s instead of 2.37 (measured).

    Returns:
        The thread count chosen, or None when the user set ``OMP_NUM_THREADS``.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = max(1, available_cores() // max(1, local_world_size()))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if rank() == 0:
        log.info("OMP_NUM_THREADS was unset: using %d thread(s) per rank (%d cores, %d local ranks)",
                 threads, available_cores(), local_world_size())
    return threads


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch the same way on every rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def own_shm_buffer() -> str | None:
    """The /dev/shm all-reduce buffer DeepSpeed's CPU comm op creates for this rank, if any.

    DeepSpeed creates it only when LOCAL_SIZE (set by the ``deepspeed`` launcher) equals
    the world size, names it after uid, MASTER_ADDR, MASTER_PORT and rank, and never
    unlinks it: 66 MiB of RAM per rank per run.
    """
    if os.environ.get("LOCAL_SIZE") != os.environ.get("WORLD_SIZE"):
        return None
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank()}"


def unlink_own_shm_buffer() -> None:
    """Remove this rank's buffer file. Call after a barrier that follows DeepSpeed's init:
    every peer has mapped it by then, and a mapping outlives its name. Never a glob: other
    runs on the machine own theirs."""
    path = own_shm_buffer()
    if path and os.path.exists(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def release_shm_buffer() -> None:
    """Unlink this rank's /dev/shm buffer as soon as every peer has mapped it. Collective
    when there is a buffer (every rank of the run has one, or none does).

    DeepSpeed's comm op creates the buffer in ``deepspeed.init_distributed()`` and maps
    every peer's before that call returns, so after a barrier every mapping exists and the
    names can go. Doing it here, before the config is checked and before
    ``deepspeed.initialize``, means an error at any later point (a bad config, a client
    optimizer that raises, a missing monitor package, a failed resume) leaves nothing behind.
    """
    import deepspeed.comm as dist

    if own_shm_buffer() is None or not dist.is_initialized():
        return
    dist.barrier()
    unlink_own_shm_buffer()


_exit_pause_registered = False


def register_exit_pause() -> None:
    """Fallback for scripts that stop before :func:`teardown`: pause briefly at exit."""
    global _exit_pause_registered
    if not _exit_pause_registered:
        atexit.register(time.sleep, EXIT_PAUSE_S)
        _exit_pause_registered = True


def teardown(engine, destroy_process_group: bool, barrier: bool = True) -> None:
    """Take the engine and (if we started it) the process group down so every rank exits 0.

    Args:
        engine: the DeepSpeed engine, or None.
        destroy_process_group: also destroy the process group; pass False when the caller
            initialized it and may still use it.
        barrier: wait for every rank first (False on the way out of an error, where a
            peer may never arrive).
    """
    import deepspeed.comm as dist

    if barrier and dist.is_initialized():
        dist.barrier()
    if engine is not None:
        engine.destroy()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
    time.sleep(EXIT_PAUSE_S)

"""DeepSpeed's C++ ops: build none that training does not use, and say so before a build.

DeepSpeed JIT-compiles its C++ ops (``torch.utils.cpp_extension.load``) the first time a
process needs one, into ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``),
silently, for a minute or more per op on a CPU. Two of them used to stand between a fresh
machine and the README's first step:

- the shared-memory all-reduce (``deepspeed_shm_comm``), which ``deepspeed.init_distributed``
  builds on a CPU although only DeepSpeed's inference (tensor-parallel) all-reduce calls it:
  training's all-reduces go through ``torch.distributed`` either way. zeroloop marks it
  unavailable before starting the process group (:func:`skip_unused_builds`), so it is
  neither built nor given its 66 MiB ``/dev/shm`` buffer per rank.
- the optimizer: a config's ``Adam``/``AdamW`` becomes DeepSpeed's ``FusedAdam`` (a C++ op
  on a CPU, a CUDA one on a GPU) unless ``"torch_adam": true`` picks torch's own AdamW,
  which needs no build (the bundled job's config does). When a build is due,
  :func:`announce_builds` says so on rank 0 before ``deepspeed.initialize`` starts it.

torch marks a build in progress with a ``lock`` file in the op's build folder, and every
other process that loads the op waits, with no time limit, until the file is gone. A process
killed during a build or a load (SIGKILL, the OOM killer, a job's time limit) leaves the file
behind, and every later DeepSpeed run on the machine hangs in ``init_distributed`` or
``initialize`` without a word. :func:`clear_stale_build_locks` removes such files first.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("zeroloop")

SHM_COMM_OP = "deepspeed_shm_comm"
# optimizer type -> (op builder without offload, with ZeRO-Offload), as DeepSpeed's engine picks them.
OPTIMIZER_BUILDERS = {
    "adam": ("FusedAdamBuilder", "CPUAdamBuilder"),
    "adamw": ("FusedAdamBuilder", "CPUAdamBuilder"),
    "lamb": ("FusedLambBuilder", "FusedLambBuilder"),
    "lion": ("FusedLionBuilder", "CPULionBuilder"),
    "adagrad": (None, "CPUAdagradBuilder"),
}


def skip_unused_builds() -> None:
    """Keep ``deepspeed.init_distributed`` from building the CPU shared-memory all-reduce op.

    Call before the process group starts. DeepSpeed keeps its op-compatibility table in
    one dict (``deepspeed.ops.__compatible_ops__``) whose edits persist; an op marked
    incompatible there is not built and its callers use ``torch.distributed``.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def optimizer_builder(config: Mapping[str, Any]) -> str | None:
    """The op builder class DeepSpeed's engine will load for the config's optimizer, or None
    (no optimizer section, torch's own optimizer, or one that needs no C++ op)."""
    optimizer = config.get("optimizer")
    if not isinstance(optimizer, Mapping):
        return None
    kind = str(optimizer.get("type", "")).lower()
    params = optimizer.get("params") or {}
    if kind not in OPTIMIZER_BUILDERS or (kind in ("adam", "adamw") and params.get("torch_adam")):
        return None
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    offloaded = str(offload.get("device", "none")).lower() in ("cpu", "nvme")
    return OPTIMIZER_BUILDERS[kind][1 if offloaded else 0]


def pending_build(builder_class: str) -> tuple[str, str] | None:
    """``(op name, build folder)`` when loading the op will compile it: not installed
    prebuilt and not in the JIT cache yet; None otherwise (or when it cannot be told)."""
    try:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import _get_build_directory

        builder = get_accelerator().create_op_builder(builder_class)
        if builder is None or installed_ops.get(builder.name, False):
            return None
        folder = _get_build_directory(builder.name, verbose=False)
    except Exception:  # noqa: BLE001 - an announcement is never worth a failure
        return None
    if os.path.isfile(os.path.join(folder, f"{builder.name}.so")):
        return None
    return builder.name, folder


def announce_builds(config: Mapping[str, Any], rank: int) -> str | None:
    """On rank 0, log the C++ op ``deepspeed.initialize`` is about to compile, if any.

    Returns:
        The message logged (None when nothing will be built, or on other ranks).
    """
    builder_class = optimizer_builder(config)
    pending = pending_build(builder_class) if builder_class and rank == 0 else None
    if pending is None:
        return None
    name, folder = pending
    message = (f"building DeepSpeed's C++ op {name} for the config's optimizer (once per machine, a minute or "
               f"more; cached in {folder})")
    if builder_class == "FusedAdamBuilder":
        message += ". \"torch_adam\": true in optimizer.params uses torch's AdamW instead, with no build"
    log.info(message)
    return message


def clear_stale_build_locks(extensions_dir: str | None = None, recheck_s: float = 1.0) -> list[str]:
    """Remove the op-build ``lock`` files that no process on this machine holds any more.

    torch's ``FileBaton`` keeps its lock file open from creating it to removing it, so a lock
    that no process has open is left over from a killed one. It is removed only when no
    process had it open at two looks ``recheck_s`` apart, which also lets a holder finish
    removing its own. Call it on one process per machine (local rank 0) before the process
    group starts. Linux only (reads ``/proc``); it does nothing elsewhere. Holders on other
    machines are invisible: keep ``TORCH_EXTENSIONS_DIR`` node-local when home folders are shared.

    Args:
        extensions_dir: the ``TORCH_EXTENSIONS_DIR`` the ranks will use; None for this
            process's (torch's default when unset).
        recheck_s: seconds between the two looks.

    Returns:
        The lock files removed; each is logged as a warning.
    """
    if not os.path.isdir("/proc/self/fd"):
        return []
    candidates = [lock for lock in _build_locks(extensions_dir) if not _held_open(lock)]
    if not candidates:
        return []
    time.sleep(recheck_s)
    removed = []
    for lock in candidates:
        if os.path.exists(lock) and not _held_open(lock):
            try:
                os.remove(lock)
            except FileNotFoundError:
                continue
            log.warning(f"removed {lock}: a C++ op build lock left by a process that was killed while "
                        "building or loading the op; with it, this run would have waited forever")
            removed.append(lock)
    return removed


def _extensions_root() -> str:
    """The folder torch JIT-builds C++ ops under, as ``torch.utils.cpp_extension`` names it."""
    from torch.utils.cpp_extension import _get_build_directory

    # An empty op name gives the root itself, so no op's build folder is created on the way.
    return os.path.normpath(_get_build_directory("", verbose=False))


def _build_locks(extensions_dir: str | None) -> list[str]:
    try:
        root = extensions_dir or _extensions_root()
    except Exception:  # noqa: BLE001 - no cache folder: nothing to clear
        return []
    return sorted(glob.glob(os.path.join(glob.escape(root), "*", "lock")))


def _held_open(path: str) -> bool:
    """Whether any process this one may inspect has ``path`` open (``/proc/*/fd``)."""
    target = os.path.realpath(path)
    for fd_folder in glob.glob("/proc/[0-9]*/fd"):
        try:
            fds = os.listdir(fd_folder)
        except OSError:  # gone meanwhile, or another user's
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_folder, fd)) == target:
                    return True
            except OSError:
                continue
    return False

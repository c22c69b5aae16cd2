"""The launcher above a rank, and what the rank does when the launcher is gone.

``deepspeed`` (DeepSpeed's runner), DeepSpeed's per-machine ``launch.py`` and ``torchrun``
start each rank as a child process. Each forwards signals differently (see
docs/launching.md); none of them can take its ranks down when it dies itself: a launcher
killed with SIGKILL (by a scheduler, the OOM killer or a user), or the ``deepspeed`` runner
stopped by SIGTERM (on one machine it installs no handler and forwards nothing), leaves its
ranks training on as orphans, which no later ``scancel`` or job restart knows about.

So every rank watches its launcher processes, and when one exits first, the rank sends
itself SIGTERM: inside ``train()`` that saves a checkpoint at the next optimizer step and
stops cleanly, exactly as a SIGTERM from the launcher would; outside it, the default
action ends the process. The watch is a daemon thread blocked in ``poll()`` on a pidfd of
each launcher (no busy polling); it starts with the process group
(:func:`zeroloop.runtime.init_distributed`) and only when a known launcher is the parent.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

log = logging.getLogger("zeroloop")

RUNNER = "deepspeed runner"  # `deepspeed` / `ds`: starts launch.py (locally, or per machine over pdsh)
LAUNCH_PY = "deepspeed launch.py"  # starts the ranks of one machine
TORCHRUN = "torchrun"
# Seconds between checks where pidfds are not available (Linux < 5.3).
POLL_INTERVAL_S = 1.0


@dataclass(frozen=True)
class LauncherProcess:
    """A launcher process a rank must not outlive.

    Attributes:
        pid: its process id.
        kind: ``"torchrun"``, ``"deepspeed launch.py"`` or ``"deepspeed runner"``.
        start_time: its start time in clock ticks since boot (``/proc/<pid>/stat``), which
            tells it apart from a later process that reuses the pid.
    """

    pid: int
    kind: str
    start_time: int


def launcher_kind(cmdline: Sequence[str]) -> str | None:
    """Which launcher a command line runs, or None for anything else.

    Args:
        cmdline: the process's arguments, as in ``/proc/<pid>/cmdline``.

    Returns:
        :data:`RUNNER`, :data:`LAUNCH_PY`, :data:`TORCHRUN` or None.
    """
    if not cmdline:
        return None
    module, script = None, cmdline[0]
    if os.path.basename(cmdline[0]).startswith("python"):
        module, script = _module_or_script(cmdline[1:])
    name = os.path.basename(script or "")
    if module == "deepspeed.launcher.launch" or (script or "").endswith(os.path.join("deepspeed", "launcher",
                                                                                      "launch.py")):
        return LAUNCH_PY
    if module == "deepspeed.launcher.runner" or name in ("deepspeed", "ds"):
        return RUNNER
    if module in ("torch.distributed.run", "torch.distributed.launch") or name == "torchrun":
        return TORCHRUN
    return None


def _module_or_script(args: Sequence[str]) -> tuple[str | None, str | None]:
    """``(module, None)`` for ``python [options] -m module``, ``(None, script)`` for
    ``python [options] script``; options that take a value (-W, -X, -c) are skipped whole."""
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "-m":
            return (args[index + 1] if index + 1 < len(args) else None), None
        if arg in ("-W", "-X", "-c", "--check-hash-based-pycs"):
            index += 2
            continue
        if arg.startswith("-"):
            index += 1
            continue
        return None, arg
    return None, None


def launcher_processes(pid: int | None = None) -> list[LauncherProcess]:
    """The launcher processes above ``pid`` that it must not outlive, nearest first.

    Its parent, when the parent is a launcher; and, when the parent is DeepSpeed's
    ``launch.py`` started by the ``deepspeed`` runner on this machine, the runner too (a
    SIGTERM kills the runner without reaching ``launch.py``).

    Args:
        pid: a process id; default: this process.

    Returns:
        The launchers found; empty when the parent is no launcher (a plain ``python`` run,
        ``zeroloop.testing.run_ranks``) or where ``/proc`` cannot be read.
    """
    found = []
    child = os.getpid() if pid is None else pid
    for _ in range(2):
        parent = _parent_pid(child)
        if parent is None or parent <= 1:
            break
        kind = launcher_kind(_cmdline(parent))
        if kind is None or (found and kind != RUNNER):
            break
        start_time = start_time_of(parent)
        if start_time is None:
            break
        found.append(LauncherProcess(parent, kind, start_time))
        if kind != LAUNCH_PY:
            break
        child = parent
    return found


def _proc_stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()


def _parent_pid(pid: int) -> int | None:
    fields = _proc_stat_fields(pid)
    return int(fields[1]) if fields else None  # state, ppid, ...


def start_time_of(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None when it is gone or a zombie."""
    fields = _proc_stat_fields(pid)
    return int(fields[19]) if fields and fields[0] != "Z" else None  # field 22 of stat(5)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def is_running(process: LauncherProcess) -> bool:
    """The process is alive and not a zombie, and is the same process (not a reused pid)."""
    return start_time_of(process.pid) == process.start_time


class ProcessWatch:
    """Calls ``on_exit(process)`` once, from a daemon thread, when the first of ``processes`` exits.

    Args:
        processes: the processes to watch.
        on_exit: called with the process that exited first.
    """

    def __init__(self, processes: Sequence[LauncherProcess], on_exit: Callable[[LauncherProcess], None]):
        self.processes = list(processes)
        self.on_exit = on_exit
        self._thread = threading.Thread(target=self._run, name="zeroloop-launcher-watch", daemon=True)

    def start(self) -> ProcessWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        exited = self._wait_with_pidfds() if hasattr(os, "pidfd_open") else None
        if exited is None:
            exited = self._wait_by_polling()
        self.on_exit(exited)

    def _wait_with_pidfds(self) -> LauncherProcess | None:
        """Block until a watched process exits; None where pidfds cannot be opened."""
        poller, by_fd = select.poll(), {}
        try:
            for process in self.processes:
                try:
                    fd = os.pidfd_open(process.pid)
                except ProcessLookupError:
                    return process  # already gone
                by_fd[fd] = process
                poller.register(fd, select.POLLIN)
                if not is_running(process):  # the pid was reused before the pidfd was opened
                    return process
            while True:
                for fd, _ in poller.poll():
                    return by_fd[fd]
        except OSError:
            return None
        finally:
            for fd in by_fd:
                os.close(fd)

    def _wait_by_polling(self) -> LauncherProcess:
        while True:
            for process in self.processes:
                if not is_running(process):
                    return process
            time.sleep(POLL_INTERVAL_S)


class _IgnoringStopSignals:
    """A DataLoader ``worker_init_fn`` that makes the worker ignore SIGTERM and SIGINT, then
    calls the loader's own (a class, not a closure, so that spawned workers can unpickle it)."""

    def __init__(self, inner: Callable[[int], None] | None):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def shield_loader_workers(loader: object) -> None:
    """Keep a DataLoader's worker processes alive through a stop signal sent to the job.

    A SIGTERM sent to a process group (torchrun signals each rank's group, SLURM every
    process, DeepSpeed's ``launch.py`` each rank's process tree) also reaches the rank's
    DataLoader workers. PyTorch's workers die of any SIGTERM their parent did not send, and
    the rank then fails with "DataLoader worker ... is killed by signal: Terminated" before
    it can save. The rank decides when to stop; its workers end with it (they exit when the
    loader shuts them down, or notice within seconds that the rank is gone).

    Args:
        loader: a ``torch.utils.data.DataLoader`` (anything else is left alone).
    """
    from torch.utils.data import DataLoader

    if isinstance(loader, DataLoader) and loader.num_workers > 0 and \
            not isinstance(loader.worker_init_fn, _IgnoringStopSignals):
        loader.worker_init_fn = _IgnoringStopSignals(loader.worker_init_fn)


_watch: ProcessWatch | None = None
_watch_lock = threading.Lock()


def watch_launcher() -> ProcessWatch | None:
    """Make this rank stop when its launcher exits first (at most one watch per process).

    When a launcher process from :func:`launcher_processes` exits while this rank runs,
    the rank logs it and sends itself SIGTERM: inside ``TrainerLoop.train()`` with
    checkpoints, a checkpoint is saved at the next optimizer step and training stops
    cleanly; anywhere else the process ends, as any SIGTERM would end it.

    Returns:
        The watch, or None when no launcher started this process.
    """
    global _watch
    with _watch_lock:
        if _watch is None:
            processes = launcher_processes()
            if processes:
                _watch = ProcessWatch(processes, _stop_this_rank).start()
        return _watch


def _stop_this_rank(launcher: LauncherProcess) -> None:
    log.warning("the launcher (%s, pid %d) has exited while this rank runs: stopping as on SIGTERM",
                launcher.kind, launcher.pid)
    os.kill(os.getpid(), signal.SIGTERM)


__all__ = ["LauncherProcess", "ProcessWatch", "launcher_kind", "launcher_processes", "shield_loader_workers",
           "start_time_of", "watch_launcher"]

"""Preemption as clusters send it: a signal to the launcher, to the ranks or to the whole job.

One 2-rank launch per launcher and signal target (tests/scripts/preempt_train.py trains
until stopped). In every case both ranks must save one checkpoint, stop and leave
``train()`` normally, no rank may outlive its launcher by more than its save, nothing may
be left in /dev/shm, and the launcher's exit code must be the one docs/launching.md gives
for that case: 0 where the launcher lets it, else what the launcher itself does.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import RegressionData
from torch.utils.data import DataLoader

from zeroloop.checkpoint import LATEST, list_checkpoints, read_manifest
from zeroloop.launcher import (LAUNCH_PY, RUNNER, TORCHRUN, LauncherProcess, ProcessWatch, launcher_kind,
                               launcher_processes, shield_loader_workers, start_time_of)
from zeroloop.runtime import free_port
from zeroloop.testing import remove_shm_buffers

SCRIPT = Path(__file__).parent / "scripts" / "preempt_train.py"
START_TIMEOUT_S = 300  # both ranks past their first step (cold DeepSpeed imports on a busy machine)
STOP_TIMEOUT_S = 120  # from the signal to the launcher's exit
RANKS_GONE_TIMEOUT_S = 60  # from the launcher's exit to the last rank's

# (launcher, signal target, signal, the launcher command's exit code[, DataLoader workers])
CASES = [
    # The runner installs no handler on one machine: SIGTERM kills it at once; the ranks see
    # it go, save and exit 0 (launch.py, orphaned, then exits 0 too).
    ("deepspeed", "runner", signal.SIGTERM, -signal.SIGTERM),
    # launch.py forwards SIGTERM to every rank, waits for them, then exits 1 whatever they
    # returned; the runner passes the 1 on.
    ("deepspeed", "launch.py", signal.SIGTERM, 1),
    # The ranks save and exit 0; launch.py and the runner then exit 0.
    ("deepspeed", "ranks", signal.SIGTERM, 0),
    # kill -TERM -<pgid>, or SLURM's scancel: every process at once; the runner dies (143).
    ("deepspeed", "group", signal.SIGTERM, -signal.SIGTERM),
    ("deepspeed", "runner", signal.SIGKILL, -signal.SIGKILL),
    # The runner treats launch.py's death by a signal (a negative code) as success.
    ("deepspeed", "launch.py", signal.SIGKILL, 0),
    # torchrun forwards the signal, waits up to --shutdown-timeout (30 s), then raises
    # SignalException: exit 1 with a traceback.
    ("torchrun", "torchrun", signal.SIGTERM, 1),
    ("torchrun", "ranks", signal.SIGTERM, 0),
    # torchrun starts each rank in its own session: a process-group signal reaches torchrun only.
    ("torchrun", "group", signal.SIGTERM, 1),
    # SLURM signals every process of the job, whatever its session.
    ("torchrun", "every process", signal.SIGTERM, 1),
    ("torchrun", "torchrun", signal.SIGKILL, -signal.SIGKILL),
    # A signal to a rank's process group or tree also reaches its DataLoader workers, which
    # PyTorch makes die of it: the loop makes them ignore it.
    ("torchrun", "torchrun", signal.SIGTERM, 1, 2),
    ("deepspeed", "launch.py", signal.SIGTERM, 1, 2),
]
CASES = [case if len(case) == 5 else case + (0,) for case in CASES]


def command(launcher, port, out, workers):
    bindir = Path(sys.executable).parent
    script = [str(SCRIPT), "--out", out, "--workers", str(workers)]
    if launcher == "deepspeed":
        return [str(bindir / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)] + script
    return [str(bindir / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
            str(port)] + script


def wait_for_ranks(out, launcher_proc, log_path):
    ready = [out / f"ready_rank{rank}.json" for rank in range(2)]
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(path.exists() for path in ready):
        assert launcher_proc.poll() is None, log_path.read_text()[-4000:]
        assert time.monotonic() < deadline, "the ranks did not start training in time"
        time.sleep(0.2)
    return [json.loads(path.read_text())["pid"] for path in ready]


def targets(launcher_proc, target, rank_pids):
    """The pids to signal (or, for "group", the process group)."""
    if target in ("runner", "torchrun"):
        return [launcher_proc.pid]
    if target == "launch.py":
        (child,) = psutil.Process(launcher_proc.pid).children()
        return [child.pid]
    if target == "ranks":
        return rank_pids
    return []


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.launcher
@pytest.mark.parametrize("launcher,target,signum,exit_code,workers", CASES,
                         ids=[f"{c[0]}-{c[1].replace(' ', '_')}-{c[2].name}" + (f"-{c[4]}workers" if c[4] else "")
                              for c in CASES])
def test_signal_saves_once_and_stops(launcher, target, signum, exit_code, workers, tmp_path):
    port, out, log_path = free_port(), tmp_path / "run", tmp_path / "output.log"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR", "OMP_NUM_THREADS")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(launcher, port, str(out), workers), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its own process group: killpg spares pytest
    rank_pids = []
    try:
        rank_pids = wait_for_ranks(out, proc, log_path)
        for pid in targets(proc, target, rank_pids):
            os.kill(pid, signum)
        if target in ("group", "every process"):
            os.killpg(proc.pid, signum)
        if target == "every process":
            for pid in rank_pids:
                os.kill(pid, signum)
        returncode = proc.wait(timeout=STOP_TIMEOUT_S)
        deadline = time.monotonic() + RANKS_GONE_TIMEOUT_S
        while any(alive(pid) for pid in rank_pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        output = log_path.read_text()
        assert not any(alive(pid) for pid in rank_pids), f"a rank outlived its launcher\n{output[-4000:]}"
        assert returncode == exit_code, output[-4000:]
        assert "terminate called" not in output

        reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
        steps = reports[0]["steps"]
        assert reports[1]["steps"] == steps and steps >= 1
        folder = out / "checkpoints"
        assert [step for step, _ in list_checkpoints(str(folder))] == [steps]  # saved once, at the stop
        assert (folder / LATEST).read_text() == f"global_step{steps}"
        assert read_manifest(str(folder / f"global_step{steps}"))["global_step"] == steps
        assert not [name for name in os.listdir("/dev/shm") if f"_{port}_" in name]
    finally:
        for pid in [proc.pid] + rank_pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        remove_shm_buffers(port)


def test_launcher_kind_reads_the_command_line():
    python = "/usr/bin/python3.11"
    assert launcher_kind([python, "/venv/bin/deepspeed", "--num_gpus", "2", "train.py"]) == RUNNER
    assert launcher_kind([python, "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30="]) == LAUNCH_PY
    assert launcher_kind([python, "/venv/lib/site-packages/deepspeed/launcher/launch.py"]) == LAUNCH_PY
    assert launcher_kind([python, "/venv/bin/torchrun", "--nproc_per_node", "2", "train.py"]) == TORCHRUN
    assert launcher_kind([python, "-X", "faulthandler", "-m", "torch.distributed.run", "train.py"]) == TORCHRUN
    assert launcher_kind(["/venv/bin/torchrun", "train.py"]) == TORCHRUN
    assert launcher_kind([python, "-m", "pytest", "tests"]) is None
    assert launcher_kind([python, "train.py", "--deepspeed"]) is None
    assert launcher_kind(["/bin/bash", "run.sh"]) is None
    assert launcher_kind([]) is None


def watched_sleeper():
    sleeper = subprocess.Popen(["sleep", "60"])
    start_time = start_time_of(sleeper.pid)
    return sleeper, LauncherProcess(sleeper.pid, "test", start_time)


@pytest.mark.parametrize("pidfds", [True, False], ids=["pidfd", "polling"])
def test_process_watch_reports_the_exit(pidfds, monkeypatch):
    if not pidfds:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    sleeper, process = watched_sleeper()
    exited = threading.Event()
    seen = []
    ProcessWatch([process], lambda p: (seen.append(p), exited.set())).start()
    assert not exited.wait(0.5)  # still running
    sleeper.kill()
    sleeper.wait()
    assert exited.wait(10) and seen == [process]


def test_process_watch_takes_a_reused_pid_for_an_exit():
    sleeper, process = watched_sleeper()
    try:
        impostor = LauncherProcess(process.pid, "test", process.start_time - 1)  # another process's start time
        exited = threading.Event()
        ProcessWatch([impostor], lambda p: exited.set()).start()
        assert exited.wait(10)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_no_launcher_above_pytest():
    # pytest's parent is a shell or an IDE: no watch, and a plain `python` run is never stopped.
    assert launcher_processes() == []


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_shielded_loader_workers_survive_a_sigterm(context):
    loader = DataLoader(RegressionData(64), batch_size=2, num_workers=1, multiprocessing_context=context)
    shield_loader_workers(loader)
    shield_loader_workers(loader)  # once is enough: no double wrapping
    assert loader.worker_init_fn.inner is None
    batches = iter(loader)
    next(batches)
    (worker,) = batches._workers
    os.kill(worker.pid, signal.SIGTERM)  # not from its parent: PyTorch's own handler would kill it
    time.sleep(0.5)
    assert len(list(batches)) == 31 and worker.is_alive() is False  # all batches, then a normal shutdown

"""Fault injection: SIGKILL a 2-rank training at random moments, resume, and check nothing is lost.

A ZeRO-2 run (gradient accumulation 2, WarmupDecayLR, shuffled DistributedSampler, dropout)
saves a checkpoint after every optimizer step. Each trial starts both ranks (resuming from
``latest``), waits a random time and SIGKILLs the whole process group: in start-up, in the
resume, between steps or inside a save. After each kill the script checks that

- the checkpoint ``resume="latest"`` would pick is complete (manifest and file sizes),
- no checkpoint reported complete ("checkpoint saved: ..." in rank 0's log) is lost, other
  than by keep-K rotation after newer complete ones,
- the next trial resumes from exactly that checkpoint.

Then one SIGTERM trial (both ranks must exit 0 with a new checkpoint), then a last run to
the end; its final weights must equal an uninterrupted run's, bit for bit. What killed ranks
leave behind (their port, /dev/shm buffers named after it, temporary tag folders) is
cleaned up so that trials stay independent. Results go to ``benchmarks/results/fault_injection.json``.

Usage::

    python benchmarks/fault_injection.py                 # 24 trials, about 10 minutes on 2 busy cores
    python benchmarks/fault_injection.py --trials 30 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # zeroloop from this checkout; the tests' tiny model

KEEP = int(os.environ.get("FI_KEEP", 2))
WORLD_SIZE = 2
SAVED = re.compile(r"checkpoint saved: (\S+)")
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")
READY = re.compile(r"resumed from|starting fresh")


# --- one rank ---------------------------------------------------------------------------------------


def rank_main(args) -> None:
    """One rank of the training (started by the driver with the rank variables set)."""
    import logging

    import torch
    from helpers import MLPRegressor, RegressionData
    from safetensors.torch import save_file
    from torch import nn

    from zeroloop import LogSettings, TrainerLoop
    from zeroloop.checkpoint import CheckpointSettings
    from zeroloop.testing import full_parameters, tiny_config

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("zeroloop").setLevel(logging.INFO)

    class Loop(TrainerLoop):
        def on_train_end(self, summary):
            weights = full_parameters(self.engine)
            if self.rank == 0:
                save_file(weights, args.weights_out)

    torch.manual_seed(0)
    model = MLPRegressor()
    model.net.insert(2, nn.Dropout(0.25))
    config = tiny_config(stage=2, micro=2, ga=2, lr=1e-2)
    config["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                              "warmup_num_steps": 10, "total_num_steps": "auto"}}
    loop = Loop(model, config, train_data=RegressionData(256), output_dir=args.output_dir, max_steps=args.steps,
                seed=3, log=LogSettings(every=10, progress_bar=False),
                checkpoint=CheckpointSettings(every=1, keep=args.keep, resume="latest"))
    loop.train()


# --- the driver -------------------------------------------------------------------------------------


def launch(output_dir: str, steps: int, weights_out: str, log_prefix: str):
    """Start both ranks in a new process group. Returns (processes, port, log paths)."""
    from zeroloop.runtime import free_port

    port = free_port()
    procs, logs = [], []
    for rank in range(WORLD_SIZE):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                   LOCAL_WORLD_SIZE=str(WORLD_SIZE), LOCAL_SIZE=str(WORLD_SIZE),  # as the deepspeed launcher
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        log_path = f"{log_prefix}_rank{rank}.log"
        with open(log_path, "w") as log_file:
            group = procs[0].pid if procs else 0  # rank 0 leads a new process group; rank 1 joins it
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "rank", "--output-dir", output_dir,
                 "--steps", str(steps), "--weights-out", weights_out, "--keep", str(KEEP)],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, process_group=group))
        logs.append(log_path)
    return procs, port, logs


def wait_all(procs, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
    return codes


def read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def wait_for(pattern: re.Pattern, path: str, procs, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pattern.search(read(path)):
            return True
        if any(proc.poll() is not None for proc in procs):
            return False
        time.sleep(0.05)
    return False


def unfinished_saves(folder: str) -> dict[str, int]:
    """Temporary tag folders and folders being deleted, with their modification times (ns)."""
    if not os.path.isdir(folder):
        return {}
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)
            if name.endswith((".tmp", ".deleting"))}


def unfinished_save(folder: str) -> bool:
    return bool(unfinished_saves(folder))


def wait_for_save(folder: str, procs, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(proc.poll() is None for proc in procs):
        if unfinished_save(folder):
            return True
        time.sleep(0.001)
    return False


def clean_up(port: int) -> list[str]:
    """What killed ranks leave: their /dev/shm buffers (named after the run's port)."""
    from zeroloop.testing import remove_shm_buffers

    return remove_shm_buffers(port)


def step_of(path: str) -> int:
    return int(re.search(r"global_step(\d+)$", path.rstrip("/")).group(1))


def check_after_kill(folder: str, reported: set[int]) -> tuple[int | None, list[str]]:
    """The step ``latest`` resolves to, and every broken promise found."""
    from zeroloop.checkpoint import CheckpointError, find_checkpoint, list_checkpoints

    problems = []
    try:
        chosen = find_checkpoint("latest", folder)
    except CheckpointError as e:
        return None, [f"no resumable checkpoint: {e}"]
    chosen_step = None if chosen is None else step_of(chosen)
    if reported and (chosen_step is None or chosen_step < max(reported)):
        problems.append(f"resume would use step {chosen_step}, but step {max(reported)} was reported complete")
    complete = [step for step, _ in list_checkpoints(folder)]
    for step in sorted(reported):
        newer = [s for s in complete if s > step]
        if step not in complete and len(newer) < KEEP:
            problems.append(f"step {step} was reported complete and is gone (only {newer} newer)")
    return chosen_step, problems


def run_driver(args) -> int:
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="zeroloop-faults-")
    env_defaults = {"DS_ACCELERATOR": "cpu"}  # C++ ops: torch's default cache, shared with every run
    for key, value in env_defaults.items():
        os.environ.setdefault(key, value)
    started = time.monotonic()
    result = {"trials": [], "steps": args.steps, "keep": KEEP, "save_every": 1, "world_size": WORLD_SIZE,
              "zero_stage": 2, "seed": args.seed}
    problems: list[str] = []

    print(f"reference: an uninterrupted run of {args.steps} steps", flush=True)
    ref_weights = os.path.join(work, "reference.safetensors")
    procs, port, _ = launch(os.path.join(work, "reference"), args.steps, ref_weights, os.path.join(work, "reference"))
    codes = wait_all(procs, timeout=600)
    clean_up(port)
    if codes != [0, 0]:
        print(f"the reference run failed: exit codes {codes}; logs in {work}")
        return 2

    out = os.path.join(work, "faulted")
    folder = os.path.join(out, "checkpoints")
    weights = os.path.join(work, "faulted.safetensors")
    reported: set[int] = set()
    expected_resume: int | None = None
    for trial in range(args.trials):
        log_prefix = os.path.join(work, f"trial{trial:02d}")
        left_before = unfinished_saves(folder)  # by an earlier trial; this one's resume removes them
        procs, port, logs = launch(out, args.steps, weights, log_prefix)
        if trial % 4 == 3:  # any moment from launch: start-up, resume, training
            moment = "from launch"
            time.sleep(rng.uniform(1.0, 12.0))
        elif trial % 4 == 1:  # inside a save: as soon as a temporary tag folder appears
            moment = "inside a save"
            wait_for(READY, logs[0], procs, timeout=120)
            time.sleep(rng.uniform(0.0, 1.0))
            wait_for_save(folder, procs, timeout=10)
            time.sleep(rng.uniform(0.0, 0.02))
        else:  # once training runs: between steps or inside a save
            moment = "after resume"
            wait_for(READY, logs[0], procs, timeout=120)
            time.sleep(rng.uniform(0.0, 1.5))
        finished = all(proc.poll() == 0 for proc in procs)
        os.killpg(procs[0].pid, signal.SIGKILL)
        wait_all(procs, timeout=60)
        left_after = unfinished_saves(folder)
        inside_save = any(left_before.get(name) != mtime for name, mtime in left_after.items())
        removed = clean_up(port)

        text = read(logs[0])
        resumed = RESUMED.search(text)
        if expected_resume is not None and resumed and int(resumed.group(2)) != expected_resume:
            problems.append(f"trial {trial}: resumed at step {resumed.group(2)}, expected {expected_resume}")
        if expected_resume is not None and READY.search(text) and not resumed:
            problems.append(f"trial {trial}: started fresh although step {expected_resume} was resumable")
        reported.update(step_of(path) for path in SAVED.findall(text))
        chosen, found = check_after_kill(folder, reported)
        problems += [f"trial {trial}: {p}" for p in found]
        expected_resume = chosen
        record = {"trial": trial, "kill": moment, "reached_training": bool(READY.search(text)),
                  "resumed_at": int(resumed.group(2)) if resumed else None,
                  "inside_save": inside_save, "newest_reported": max(reported, default=None),
                  "resumable_step": chosen, "shm_buffers_removed": len(removed), "finished_before_kill": finished}
        result["trials"].append(record)
        print(json.dumps(record), flush=True)

    print("SIGTERM trial", flush=True)
    log_prefix = os.path.join(work, "sigterm")
    procs, port, logs = launch(out, args.steps, weights, log_prefix)
    wait_for(SAVED, logs[0], procs, timeout=120)
    before = len(SAVED.findall(read(logs[0])))
    os.killpg(procs[0].pid, signal.SIGTERM)
    codes = wait_all(procs, timeout=120)
    clean_up(port)
    text = read(logs[0])
    stop_saved = "stop requested" in text and len(SAVED.findall(text)) > before
    result["sigterm"] = {"exit_codes": codes, "saved_on_stop": stop_saved}
    if codes != [0, 0] or not stop_saved:
        problems.append(f"SIGTERM: exit codes {codes}, checkpoint saved on stop: {stop_saved}")
    reported.update(step_of(path) for path in SAVED.findall(text))
    _, found = check_after_kill(folder, reported)
    problems += [f"after SIGTERM: {p}" for p in found]

    print("last run, to the end", flush=True)
    procs, port, logs = launch(out, args.steps, weights, os.path.join(work, "final"))
    codes = wait_all(procs, timeout=600)
    clean_up(port)
    equal = codes == [0, 0] and weights_equal(ref_weights, weights)
    if not equal:
        problems.append(f"final run: exit codes {codes}; weights equal to the uninterrupted run's: {equal}")

    trials = result["trials"]
    result.update({
        "kills": len(trials),
        "kills_inside_save": sum(t["inside_save"] for t in trials),
        "kills_before_training": sum(not t["reached_training"] for t in trials),
        "resumes": sum(t["resumed_at"] is not None for t in trials),
        "final_weights_equal_uninterrupted": equal,
        "problems": problems,
        "ok": not problems,
        "wall_time_s": round(time.monotonic() - started, 1),
    })
    result["trials"] = trials
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "fault_injection.json"), "w") as f:
        json.dump(result, f, indent=1)
    summary = {k: v for k, v in result.items() if k != "trials"}
    print(json.dumps(summary, indent=1))
    if problems:
        print(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not problems else 1


def weights_equal(a: str, b: str) -> bool:
    import torch
    from safetensors.torch import load_file

    left, right = load_file(a), load_file(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    rank = sub.add_parser("rank", help="internal: one rank of the training")
    rank.add_argument("--output-dir", required=True)
    rank.add_argument("--steps", type=int, required=True)
    rank.add_argument("--weights-out", required=True)
    rank.add_argument("--keep", type=int, default=KEEP)
    parser.add_argument("--trials", type=int, default=24, help="SIGKILLs (default 24)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of the run (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    args = parser.parse_args(argv)
    if args.command == "rank":
        rank_main(args)
        return 0
    return run_driver(args)


if __name__ == "__main__":
    sys.exit(main())

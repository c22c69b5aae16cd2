"""Fault injection: SIGKILL a 2-rank training at random moments, resume, and check nothing is lost.

A ZeRO-2 run (gradient accumulation 2, WarmupDecayLR, shuffled DistributedSampler, dropout)
saves a checkpoint after every optimizer step and, at the end, its final weights
(``output_dir/final``). The trials, each SIGKILLing the whole process group at a random moment:

1. training: each trial starts both ranks (resuming from ``latest``) and kills them in
   start-up, in the resume, between steps or inside a save. After each kill the script
   checks that the checkpoint ``resume="latest"`` would pick is complete (manifest and file
   sizes), that no checkpoint reported complete ("checkpoint saved: ..." in rank 0's log) is
   lost other than by keep-K rotation after newer complete ones, and that the next trial
   resumes from exactly that checkpoint. Then one SIGTERM: both ranks must exit 0 after saving.
2. the end of the run: trials that finish the run (the first trains the remaining steps) and
   are killed inside the final weights export or at a random moment from launch. After each,
   ``final/`` must hold no weights or the uninterrupted run's, bit for bit. Then a run to
   the end: its final weights must equal the uninterrupted run's, bit for bit.
3. consolidation: ``zeroloop.consolidate`` of the run's last checkpoint into a folder (absent
   at first, later holding an earlier complete result), killed inside its writes or at a
   random moment; the folder must hold no weights or the uninterrupted consolidation's.

The tiny model's weights take milliseconds to write, so in phases 2 and 3 each tensor write is
slowed by ``--slow-write`` seconds, making the write a window a random kill can land in.
What killed ranks leave behind (their port, /dev/shm buffers named after it) is cleaned up
so that trials stay independent. Results go to ``benchmarks/results/fault_injection.json``.

Usage::

    nice -n 10 python benchmarks/fault_injection.py      # 76 + 12 + 12 kills, about an hour on 2 busy cores
    python benchmarks/fault_injection.py --trials 4 --export-trials 2 --consolidate-trials 2 --steps 200
"""

from __future__ import annotations

import argparse
import glob
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
FINAL = "final"  # the loop writes its final weights to output_dir/final
SAVED = re.compile(r"checkpoint saved: (\S+)")
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")
READY = re.compile(r"resumed from|starting fresh")


# --- one rank ---------------------------------------------------------------------------------------


def rank_main(args) -> None:
    """One rank of the training (started by the driver with the rank variables set)."""
    import logging

    import torch
    from helpers import MLPRegressor, RegressionData
    from torch import nn

    from zeroloop import LogSettings, TrainerLoop
    from zeroloop.checkpoint import CheckpointSettings
    from zeroloop.testing import tiny_config

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("zeroloop").setLevel(logging.INFO)
    slow_down_weight_writes()

    torch.manual_seed(0)
    model = MLPRegressor()
    model.net.insert(2, nn.Dropout(0.25))
    config = tiny_config(stage=2, micro=2, ga=2, lr=1e-2)
    config["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                              "warmup_num_steps": 10, "total_num_steps": "auto"}}
    loop = TrainerLoop(model, config, train_data=RegressionData(256), output_dir=args.output_dir,
                       max_steps=args.steps, seed=3, log=LogSettings(every=10, progress_bar=False),
                       checkpoint=CheckpointSettings(every=1, keep=args.keep, resume="latest"))
    loop.train()


def consolidate_main(args) -> None:
    """Consolidate a checkpoint folder (started by the driver, to be killed)."""
    from zeroloop import consolidate

    slow_down_weight_writes()
    consolidate(args.checkpoint, args.output)


def slow_down_weight_writes() -> None:
    """Sleep ``FI_SLOW_WRITE_S`` before each tensor write of a safetensors file (when set)."""
    seconds = float(os.environ.get("FI_SLOW_WRITE_S", 0))
    if not seconds:
        return
    from zeroloop.safetensors_io import SafetensorsWriter

    write = SafetensorsWriter.write

    def slow_write(self, name, element_offset, values):
        time.sleep(seconds)
        write(self, name, element_offset, values)

    SafetensorsWriter.write = slow_write


# --- the driver -------------------------------------------------------------------------------------


def launch(output_dir: str, steps: int, log_prefix: str, slow_write: float = 0.0):
    """Start both ranks in a new process group. Returns (processes, port, log paths)."""
    from zeroloop.runtime import free_port

    port = free_port()
    procs, logs = [], []
    for rank in range(WORLD_SIZE):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                   LOCAL_WORLD_SIZE=str(WORLD_SIZE), LOCAL_SIZE=str(WORLD_SIZE),  # as the deepspeed launcher
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   FI_SLOW_WRITE_S=str(slow_write))
        log_path = f"{log_prefix}_rank{rank}.log"
        with open(log_path, "w") as log_file:
            group = procs[0].pid if procs else 0  # rank 0 leads a new process group; rank 1 joins it
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "rank", "--output-dir", output_dir,
                 "--steps", str(steps), "--keep", str(KEEP)],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, process_group=group))
        logs.append(log_path)
    return procs, port, logs


def launch_consolidate(checkpoint: str, output: str, log_path: str, slow_write: float):
    env = dict(os.environ, FI_SLOW_WRITE_S=str(slow_write))
    with open(log_path, "w") as log_file:
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), "consolidate", "--checkpoint", checkpoint,
                                 "--output", output], env=env, stdout=log_file, stderr=subprocess.STDOUT)


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


def staging_dirs(parent: str, name: str) -> set[str]:
    """The temporary folders zeroloop writes ``parent/name`` weights into (``.name.partial-*``)."""
    return set(glob.glob(os.path.join(parent, f".{name}.partial-*")))


def wait_for_new(paths_now, before: set[str], alive, timeout: float) -> bool:
    """Wait until ``paths_now()`` holds a path not in ``before`` (False if ``alive()`` ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if paths_now() - before:
            return True
        time.sleep(0.002)
    return False


def weights_state(folder: str, reference: dict) -> str:
    """``"absent"`` (no weights to load), ``"equal"`` (the reference's, bit for bit) or ``"CORRUPT: ..."``."""
    import torch

    from zeroloop.errors import CheckpointNotFoundError
    from zeroloop.safetensors_io import load_state_dict

    if not os.path.isdir(folder):
        return "absent"
    try:
        found = load_state_dict(folder)
    except CheckpointNotFoundError:
        return "absent"
    except Exception as e:  # noqa: BLE001 - any other failure to load is a corrupt result
        return f"CORRUPT: {type(e).__name__}: {e}"
    if found.keys() != reference.keys() or not all(torch.equal(found[k], reference[k]) for k in reference):
        return "CORRUPT: the weights differ from the uninterrupted run's"
    return "equal"


def run_driver(args) -> int:
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="zeroloop-faults-")
    env_defaults = {"DS_ACCELERATOR": "cpu"}  # C++ ops: torch's default cache, shared with every run
    for key, value in env_defaults.items():
        os.environ.setdefault(key, value)
    started = time.monotonic()
    result = {"steps": args.steps, "keep": KEEP, "save_every": 1, "world_size": WORLD_SIZE, "zero_stage": 2,
              "seed": args.seed, "slow_write_s": args.slow_write, "load_average_at_start": os.getloadavg()}
    problems: list[str] = []

    print(f"reference: an uninterrupted run of {args.steps} steps", flush=True)
    reference_dir = os.path.join(work, "reference")
    procs, port, _ = launch(reference_dir, args.steps, reference_dir)
    codes = wait_all(procs, timeout=1800)
    clean_up(port)
    if codes != [0, 0]:
        print(f"the reference run failed: exit codes {codes}; logs in {work}")
        return 2
    from zeroloop.safetensors_io import load_state_dict

    reference = load_state_dict(os.path.join(reference_dir, FINAL))

    out = os.path.join(work, "faulted")
    state = {"folder": os.path.join(out, "checkpoints"), "reported": set(), "expected_resume": None}
    result["trials"] = [training_trial(trial, rng, work, out, args, state, problems) for trial in range(args.trials)]
    result["sigterm"] = sigterm_trial(work, out, args, state, problems)
    result["export_trials"] = [export_trial(trial, rng, work, out, args, state, reference, problems)
                               for trial in range(args.export_trials)]

    print("last run, to the end", flush=True)
    procs, port, _ = launch(out, args.steps, os.path.join(work, "final"))
    codes = wait_all(procs, timeout=1800)
    clean_up(port)
    final_state = weights_state(os.path.join(out, FINAL), reference)
    equal = codes == [0, 0] and final_state == "equal"
    if not equal:
        problems.append(f"final run: exit codes {codes}; final weights: {final_state}")

    consolidated = os.path.join(work, "consolidated")
    result["consolidate_trials"] = [consolidate_trial(trial, rng, work, state["folder"], consolidated, args,
                                                      reference, problems)
                                    for trial in range(args.consolidate_trials)]
    print("last consolidation, to the end", flush=True)
    proc = launch_consolidate(state["folder"], consolidated, os.path.join(work, "consolidate_last.log"), 0.0)
    code = proc.wait(timeout=600)
    consolidated_state = weights_state(consolidated, reference)
    if code != 0 or consolidated_state != "equal":
        problems.append(f"last consolidation: exit code {code}; its weights: {consolidated_state}")

    trials, exports, consolidations = result["trials"], result["export_trials"], result["consolidate_trials"]
    result.update({
        "kills": len(trials) + len(exports) + len(consolidations),
        "training_kills": len(trials),
        "kills_inside_save": sum(t["inside_save"] for t in trials),
        "kills_before_training": sum(not t["reached_training"] for t in trials),
        "resumes": sum(t["resumed_at"] is not None for t in trials),
        "export_kills": len(exports),
        "export_kills_inside_the_write": sum(t["inside_write"] for t in exports),
        "consolidate_kills": len(consolidations),
        "consolidate_kills_inside_the_write": sum(t["inside_write"] for t in consolidations),
        "corrupt_results": sum(t["weights"].startswith("CORRUPT") for t in exports + consolidations),
        "final_weights_equal_uninterrupted": equal,
        "consolidation_equal_uninterrupted_final_weights": consolidated_state == "equal",
        "problems": problems,
        "ok": not problems,
        "wall_time_s": round(time.monotonic() - started, 1),
        "load_average_at_end": os.getloadavg(),
    })
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    summary = {k: v for k, v in result.items() if not k.endswith("trials")}
    print(json.dumps(summary, indent=1))
    if problems:
        print(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not problems else 1


def training_trial(trial: int, rng: random.Random, work: str, out: str, args, state: dict, problems: list) -> dict:
    """Phase 1: start both ranks, SIGKILL them at a random moment, check the checkpoints."""
    folder, reported = state["folder"], state["reported"]
    log_prefix = os.path.join(work, f"trial{trial:03d}")
    left_before = unfinished_saves(folder)  # by an earlier trial; this one's resume removes them
    procs, port, logs = launch(out, args.steps, log_prefix)
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
    resumed = check_resume(trial, text, state, problems)
    record = {"trial": trial, "kill": moment, "reached_training": bool(READY.search(text)),
              "resumed_at": int(resumed.group(2)) if resumed else None, "inside_save": inside_save,
              "newest_reported": max(reported, default=None), "resumable_step": state["expected_resume"],
              "shm_buffers_removed": len(removed), "finished_before_kill": finished}
    print(json.dumps(record), flush=True)
    return record


def check_resume(trial, text: str, state: dict, problems: list):
    """After a kill: did the trial resume where it had to, and is every reported save still there?"""
    expected = state["expected_resume"]
    resumed = RESUMED.search(text)
    if expected is not None and resumed and int(resumed.group(2)) != expected:
        problems.append(f"trial {trial}: resumed at step {resumed.group(2)}, expected {expected}")
    if expected is not None and READY.search(text) and not resumed:
        problems.append(f"trial {trial}: started fresh although step {expected} was resumable")
    state["reported"].update(step_of(path) for path in SAVED.findall(text))
    chosen, found = check_after_kill(state["folder"], state["reported"])
    problems += [f"trial {trial}: {p}" for p in found]
    state["expected_resume"] = chosen
    return resumed


def sigterm_trial(work: str, out: str, args, state: dict, problems: list) -> dict:
    """Both ranks must save and exit 0 on SIGTERM."""
    print("SIGTERM trial", flush=True)
    procs, port, logs = launch(out, args.steps, os.path.join(work, "sigterm"))
    wait_for(SAVED, logs[0], procs, timeout=120)
    before = len(SAVED.findall(read(logs[0])))
    os.killpg(procs[0].pid, signal.SIGTERM)
    codes = wait_all(procs, timeout=120)
    clean_up(port)
    text = read(logs[0])
    stop_saved = "stop requested" in text and len(SAVED.findall(text)) > before
    if codes != [0, 0] or not stop_saved:
        problems.append(f"SIGTERM: exit codes {codes}, checkpoint saved on stop: {stop_saved}")
    check_resume("sigterm", text, state, problems)
    return {"exit_codes": codes, "saved_on_stop": stop_saved}


def export_trial(trial: int, rng: random.Random, work: str, out: str, args, state: dict, reference: dict,
                 problems: list) -> dict:
    """Phase 2: the run finishes (the first trial trains what is left) and is killed inside the
    final weights export, or at a random moment from launch."""
    before = staging_dirs(out, FINAL)
    procs, port, logs = launch(out, args.steps, os.path.join(work, f"export{trial:03d}"), args.slow_write)
    alive = lambda: all(proc.poll() is None for proc in procs)  # noqa: E731
    if trial % 3 != 2:
        moment = "inside the export"
        wait_for_new(lambda: staging_dirs(out, FINAL), before, alive, timeout=1800)
        time.sleep(rng.uniform(0.0, 4 * args.slow_write))
    else:
        moment = "from launch"
        time.sleep(rng.uniform(1.0, 15.0))
    inside = bool(staging_dirs(out, FINAL) - before) and alive()
    finished = all(proc.poll() == 0 for proc in procs)
    os.killpg(procs[0].pid, signal.SIGKILL)
    wait_all(procs, timeout=60)
    clean_up(port)
    check_resume(f"export {trial}", read(logs[0]), state, problems)
    weights = weights_state(os.path.join(out, FINAL), reference)
    if weights.startswith("CORRUPT"):
        problems.append(f"export trial {trial}: final weights {weights}")
    record = {"trial": trial, "kill": moment, "inside_write": inside, "finished_before_kill": finished,
              "weights": weights, "resumable_step": state["expected_resume"]}
    print(json.dumps(record), flush=True)
    return record


def consolidate_trial(trial: int, rng: random.Random, work: str, checkpoints: str, output: str, args,
                      reference: dict, problems: list) -> dict:
    """Phase 3: consolidate the finished run's checkpoint; kill it inside its writes or at a
    random moment from launch."""
    parent, name = os.path.split(output)
    before = staging_dirs(parent, name)
    proc = launch_consolidate(checkpoints, output, os.path.join(work, f"consolidate{trial:03d}.log"), args.slow_write)
    alive = lambda: proc.poll() is None  # noqa: E731
    if trial % 3 != 2:
        moment = "inside the write"
        wait_for_new(lambda: staging_dirs(parent, name), before, alive, timeout=300)
        time.sleep(rng.uniform(0.0, 8 * args.slow_write))
    else:
        moment = "from launch"
        time.sleep(rng.uniform(0.5, 10.0))
    inside = bool(staging_dirs(parent, name) - before) and alive()
    finished = proc.poll() == 0
    proc.kill()
    proc.wait(timeout=60)
    weights = weights_state(output, reference)
    if weights.startswith("CORRUPT"):
        problems.append(f"consolidate trial {trial}: {weights}")
    record = {"trial": trial, "kill": moment, "inside_write": inside, "finished_before_kill": finished,
              "weights": weights}
    print(json.dumps(record), flush=True)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    rank = sub.add_parser("rank", help="internal: one rank of the training")
    rank.add_argument("--output-dir", required=True)
    rank.add_argument("--steps", type=int, required=True)
    rank.add_argument("--keep", type=int, default=KEEP)
    merge = sub.add_parser("consolidate", help="internal: consolidate a checkpoint")
    merge.add_argument("--checkpoint", required=True)
    merge.add_argument("--output", required=True)
    parser.add_argument("--trials", type=int, default=76, help="SIGKILLs during training (default 76)")
    parser.add_argument("--export-trials", type=int, default=12, help="SIGKILLs at the end of the run (default 12)")
    parser.add_argument("--consolidate-trials", type=int, default=12, help="SIGKILLs of consolidation (default 12)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of the run (default 1000)")
    parser.add_argument("--slow-write", type=float, default=0.3,
                        help="seconds added to each tensor write in phases 2 and 3 (default 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "fault_injection.json"))
    args = parser.parse_args(argv)
    if args.command == "rank":
        rank_main(args)
        return 0
    if args.command == "consolidate":
        consolidate_main(args)
        return 0
    return run_driver(args)


if __name__ == "__main__":
    sys.exit(main())

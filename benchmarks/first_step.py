"""Time to first step: import + initialize + first optimizer step, cold and warm op cache.

Each measurement is a fresh process tree, so every import counts:
- 1 rank: ``python child.py`` (zeroloop sets the rank variables itself);
- 2 ranks: two ``python child.py`` processes with the rank variables a launcher would set
  (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, OMP_NUM_THREADS=1), spawned together;
  the wall time is until both have finished their first step.
Cold op cache: ``TORCH_EXTENSIONS_DIR`` is a fresh empty temp dir, so DeepSpeed JIT-builds
the ops it loads (on CPU: FusedAdam's CPU kernels, for the config's AdamW; before zeroloop
skipped it, also the shm all-reduce op for 2 ranks) before the first step. Warm: the default
cache, already built by an earlier run.

Breakdown reported by rank 0 (seconds, ``time.perf_counter``): ``import deepspeed``,
``import zeroloop`` (after deepspeed), ``TrainerLoop.setup()`` (which runs
``deepspeed.initialize``, and for 2 ranks the process group), and the first step (data,
forward, backward, optimizer step). The model is the bundled ``tiny`` GPT, ZeRO-2, fp32.

    PYTHONPATH=. python benchmarks/first_step.py [--repeats 2] [--skip-cold]

``--main-job``: the README's main job instead, the whole command as a user runs it
(``deepspeed -q --num_gpus 2 --module zeroloop train``, 300 steps), in interleaved rounds of
a cold op cache (a fresh empty ``TORCH_EXTENSIONS_DIR``) and a warm one (the caller's cache,
used by an unrecorded run first). Per run: the wall time, the C++ ops built into the cold
cache, and the output lines that are not zeroloop's (zeroloop's are its ``[zeroloop]`` log
lines, the progress bar and the JSON report); results in ``results/first_step_main_job.json``.

    PYTHONPATH=. python benchmarks/first_step.py --main-job [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
import deepspeed
t_deepspeed = time.perf_counter()
import zeroloop
from zeroloop import Hyperparameters, LogSettings, TrainerLoop
from zeroloop.corpus import ByteCorpus, read_corpus
from zeroloop.gpt import GPT, GPT_SIZES, GPTConfig
t_zeroloop = time.perf_counter()


class FirstStep(TrainerLoop):
    def on_train_start(self):
        self.first_step_start = time.perf_counter()

    def on_step_end(self, step, metrics):
        if step == 1:
            self.first_step_end = time.perf_counter()


config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
          "zero_optimization": {"stage": 2}, "steps_per_print": 1_000_000}
model = GPT(GPTConfig(block_size=64, **GPT_SIZES["tiny"]))
data = ByteCorpus(read_corpus(max_bytes=200_000), 64)
loop = FirstStep(model, config, train_data=data, max_steps=1, output_dir=sys.argv[1],
                 hparams=Hyperparameters(micro_batch_size=4), log=LogSettings(progress_bar=False))
t_setup0 = time.perf_counter()
loop.setup()
t_setup1 = time.perf_counter()
loop.train()
print(json.dumps({"rank": loop.rank, "import_deepspeed_s": t_deepspeed - t0,
                  "import_zeroloop_s": t_zeroloop - t_deepspeed, "model_data_s": t_setup0 - t_zeroloop,
                  "setup_s": t_setup1 - t_setup0, "first_step_s": loop.first_step_end - loop.first_step_start,
                  "in_process_s": loop.first_step_end - t0}))
'''


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(ranks: int, ext_dir: str | None, tmp: str) -> dict:
    from zeroloop.testing import remove_shm_buffers  # DeepSpeed's /dev/shm files of our port

    script = os.path.join(tmp, "first_step_child.py")
    with open(script, "w") as f:
        f.write(CHILD)
    port = free_port()
    base = dict(os.environ, OMP_NUM_THREADS="1")
    if ext_dir:
        base["TORCH_EXTENSIONS_DIR"] = ext_dir
    start = time.perf_counter()
    procs = []
    for rank in range(ranks):
        env = dict(base)
        if ranks > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
                       LOCAL_WORLD_SIZE=str(ranks),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, script, os.path.join(tmp, f"out{rank}")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp))
    try:
        outputs = [p.communicate(timeout=590) for p in procs]
    finally:
        for p in procs:
            p.kill()
        remove_shm_buffers(port)
    wall = time.perf_counter() - start
    for p, (out, err) in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"{ranks}-rank run failed:\n{err[-3000:]}")
    rank0 = json.loads(outputs[0][0].strip().splitlines()[-1])
    return {"wall_s": wall, **rank0}


def measure(ranks: int, cold: bool, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            ext_dir = os.path.join(tmp, "torch_extensions") if cold else None
            runs.append(run_once(ranks, ext_dir, tmp))
    walls = [r["wall_s"] for r in runs]
    row = {"ranks": ranks, "op_cache": "cold" if cold else "warm", "median_wall_s": statistics.median(walls),
           "runs": runs}
    print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    return row


MAIN_JOB = ["deepspeed", "-q", "--num_gpus", "2", "--module", "zeroloop", "train"]  # the README's command


def is_zeroloops(line: str) -> bool:
    """A line zeroloop printed: its log, the progress bar, the JSON report (or a blank)."""
    line = line.strip()
    return not line or line.startswith(("[zeroloop]", "train:", '{"steps"'))


def foreign_lines(output: str) -> list[str]:
    """The output lines that are not zeroloop's (the bar redraws with carriage returns)."""
    lines = [part for line in output.splitlines() for part in line.split("\r")]
    return [line for line in lines if not is_zeroloops(line)]


def run_main_job(ext_dir: str | None, tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR", "OMP_NUM_THREADS")}
    if ext_dir:
        env["TORCH_EXTENSIONS_DIR"] = ext_dir
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    command = [deepspeed, *MAIN_JOB[1:], "--output-dir", os.path.join(tmp, "gpt")]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp, timeout=3000)
    wall = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"the main job failed:\n{output[-3000:]}")
    report = json.loads([line for line in result.stdout.splitlines() if line.startswith('{"steps"')][-1])
    foreign = foreign_lines(output)
    return {"wall_s": wall, "train_wall_s": report["wall_time_s"], "final_loss": report["final_loss"],
            "eval_loss": report["eval_loss"], "ops_built": sorted(os.listdir(ext_dir)) if ext_dir else None,
            "foreign_lines": len(foreign), "foreign": foreign, "load_avg_1m": os.getloadavg()[0]}


def measure_main_job(rounds: int) -> dict:
    """Interleaved cold/warm rounds of the main job; the ratio of the medians."""
    with tempfile.TemporaryDirectory() as tmp:
        run_main_job(None, tmp)  # the warm cache has whatever the job builds: not recorded
    runs = []
    for i in range(rounds):
        for cache in ("cold", "warm"):
            with tempfile.TemporaryDirectory() as tmp:
                ext_dir = os.path.join(tmp, "torch_extensions") if cache == "cold" else None
                if ext_dir:
                    os.makedirs(ext_dir)
                run = {"round": i, "op_cache": cache, **run_main_job(ext_dir, tmp)}
            print(json.dumps({k: v for k, v in run.items() if k != "foreign"}), flush=True)
            runs.append(run)
    cold = statistics.median(r["wall_s"] for r in runs if r["op_cache"] == "cold")
    warm = statistics.median(r["wall_s"] for r in runs if r["op_cache"] == "warm")
    return {"command": " ".join(MAIN_JOB), "rounds": rounds, "median_cold_s": cold, "median_warm_s": warm,
            "cold_over_warm": cold / warm, "runs": runs}


def main(argv=None):
    sys.path.insert(0, HERE)
    from throughput import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="runs per warm configuration (cold runs once)")
    p.add_argument("--skip-cold", action="store_true")
    p.add_argument("--main-job", action="store_true", help="time the README's main job, cold vs warm op cache")
    p.add_argument("--rounds", type=int, default=2, help="--main-job: interleaved cold/warm rounds")
    p.add_argument("--out", default=None, help="default: results/first_step_cpu.json (--main-job: "
                                               "results/first_step_main_job.json)")
    args = p.parse_args(argv)
    if args.main_job:
        out = args.out or os.path.join(HERE, "results", "first_step_main_job.json")
        result = {"machine": machine(), **measure_main_job(args.rounds)}
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"cold/warm {result['cold_over_warm']:.3f}; wrote {out}")
        return
    args.out = args.out or os.path.join(HERE, "results", "first_step_cpu.json")

    results = {"machine": machine(), "model": "GPT tiny, seq 64, micro-batch 4, ZeRO-2 fp32", "rows": []}
    measure(1, cold=False, repeats=1)  # make sure the default cache is built: not recorded
    for ranks in (1, 2):
        results["rows"].append(measure(ranks, cold=False, repeats=args.repeats))
        if not args.skip_cold:
            results["rows"].append(measure(ranks, cold=True, repeats=1))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

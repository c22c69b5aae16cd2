"""Warm-cache wall time of the unit tests a user writes with ``zeroloop.testing`` (issue 9).

Two tests, each in a fresh ``python`` subprocess so that imports count, as they do in a
pytest run of one test file:
- single-process: ``single_process()`` around a tiny ``TrainerLoop`` for 2 steps;
- 2 ranks: ``run_ranks(fn, 2)`` where each rank trains the same tiny loop for 2 steps.

Targets on this machine (2 CPU cores): single-process < 10 s, 2 ranks < 15 s. The child
also reports where its time went (import, the whole test), and the time DeepSpeed spends
in py-cpuinfo (``cpuinfo.get_cpu_info``, a subprocess per call) inside initialize.

    PYTHONPATH=. python benchmarks/test_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_S = {"single_process": 10.0, "two_ranks": 15.0}

# The child: what a user's test file does, plus timers. Times are seconds.
CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
import torch
from torch import nn
from torch.utils.data import TensorDataset
import zeroloop
from zeroloop import TrainerLoop
from zeroloop.testing import run_ranks, single_process, tiny_config
t_import = time.perf_counter() - t0


def cpuinfo_timer():
    """Wrap py-cpuinfo's entry point to add up the seconds spent in it."""
    import cpuinfo
    spent = [0.0]
    original = cpuinfo.get_cpu_info
    def timed():
        start = time.perf_counter()
        try:
            return original()
        finally:
            spent[0] += time.perf_counter() - start
    cpuinfo.get_cpu_info = timed
    return spent


def two_steps(rank, out_dir):
    spent = cpuinfo_timer()
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True))
    model = nn.Linear(8, 1)
    loop = TrainerLoop(model, tiny_config(stage=2), train_data=data, max_steps=2,
                       loss_fn=nn.functional.mse_loss, output_dir=out_dir)
    start = time.perf_counter()
    summary = loop.train()
    return {"train_s": time.perf_counter() - start, "cpuinfo_s": spent[0], "steps": summary.steps}


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], sys.argv[2]
    t1 = time.perf_counter()
    if mode == "single_process":
        with single_process():
            ranks = [two_steps(0, out_dir)]
    else:
        ranks = run_ranks(two_steps, 2, out_dir, timeout=120)
    print(json.dumps({"import_s": t_import, "test_s": time.perf_counter() - t1, "ranks": ranks}))
'''


def run_once(mode: str, tmp: str) -> dict:
    script = os.path.join(tmp, "speed_child.py")
    with open(script, "w") as f:
        f.write(CHILD)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, script, mode, os.path.join(tmp, mode)], capture_output=True,
                          text=True, cwd=tmp, timeout=300)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, **child}


def main(argv=None):
    import tempfile

    sys.path.insert(0, HERE)
    from throughput import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(HERE, "results", "test_speed_cpu.json"))
    args = p.parse_args(argv)

    results = {"machine": machine(), "target_s": TARGET_S, "runs": {}, "summary": {}}
    with tempfile.TemporaryDirectory() as tmp:
        run_once("single_process", tmp)  # warms the op cache and the page cache; not counted
        for mode in TARGET_S:
            runs = [run_once(mode, tmp) for _ in range(args.repeats)]
            walls = [r["wall_s"] for r in runs]
            results["runs"][mode] = runs
            results["summary"][mode] = {"median_wall_s": statistics.median(walls), "min_wall_s": min(walls),
                                        "meets_target": statistics.median(walls) < TARGET_S[mode]}
            print(mode, json.dumps(results["summary"][mode]), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

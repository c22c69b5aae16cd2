"""Does every rank exit 0, every time? Runs a 2-rank TrainerLoop script N times per launcher.

Plain 2-rank DeepSpeed runs on CPU abort at interpreter exit ("terminate called without an
active exception") in 5-35% of runs; zeroloop's teardown is meant to make that 0. This counts
non-zero exits, aborts and /dev/shm buffers left behind, per launcher.

    python benchmarks/clean_exit.py --runs 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zeroloop.runtime import free_port

SCRIPT = Path(__file__).resolve().parent.parent / "tests" / "scripts" / "tiny_train.py"


def launch(launcher: str, port: int, out: str) -> list[str]:
    bindir = Path(sys.executable).parent
    if launcher == "deepspeed":
        return [str(bindir / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), str(SCRIPT), "--out", out]
    return [str(bindir / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
            str(port), str(SCRIPT), "--out", out]


def one_run(launcher: str) -> dict:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "OMP_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as out:
        started = time.monotonic()
        result = subprocess.run(launch(launcher, port, out), capture_output=True, text=True, env=env, timeout=600)
    output = result.stdout + result.stderr
    leftovers = [f for f in os.listdir("/dev/shm") if f"_{port}_" in f]
    for name in leftovers:  # keep trials independent
        os.unlink(os.path.join("/dev/shm", name))
    run = {"returncode": result.returncode, "aborted": "terminate called" in output,
           "shm_left": len(leftovers), "seconds": round(time.monotonic() - started, 1)}
    if result.returncode != 0:
        run["output_tail"] = output[-3000:]
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--launchers", nargs="+", default=["deepspeed", "torchrun"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "clean_exit.json"))
    args = parser.parse_args(argv)
    summary = {}
    for launcher in args.launchers:
        runs = [one_run(launcher) for _ in range(args.runs)]
        summary[launcher] = {"runs": args.runs, "nonzero_exits": sum(r["returncode"] != 0 for r in runs),
                             "aborts": sum(r["aborted"] for r in runs),
                             "shm_files_left": sum(r["shm_left"] for r in runs),
                             "median_seconds": sorted(r["seconds"] for r in runs)[len(runs) // 2],
                             "failures": [r["output_tail"] for r in runs if "output_tail" in r]}
        print(launcher, json.dumps({k: v for k, v in summary[launcher].items() if k != "failures"}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"script": str(SCRIPT.name), "results": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the universal-checkpoint conversion against DeepSpeed's ``ds_to_universal``.

The checkpoint is the consolidation benchmark's (``benchmarks/consolidate.py``): a GPT of
~302M parameters (24 layers, width 1024), ZeRO-3 on 2 CPU ranks, one optimizer step, 3.6 GB.
Each method converts it in its own process, rounds interleaved; recorded per run: wall time,
the peak resident set of the largest process (``os.wait4``) and the peak of the whole
process tree's resident memory (summed over the tree, sampled every 20 ms from /proc:
``ds_to_universal`` works in pools of worker processes). Methods:

- ``zeroloop``: ``python -m zeroloop universal TAG --output OUT`` (one process, streaming).
- ``ds_to_universal``: ``python -m deepspeed.checkpoint.ds_to_universal`` with its default
  workers (4 extracting, 2 merging).
- ``ds_to_universal_1worker``: the same with one worker each (it then works in-process).

Both outputs are compared file by file: every parameter's fp32, exp_avg and exp_avg_sq
tensor, bit for bit. Ratios are zeroloop's numbers over each DeepSpeed method's. Targets:
peak memory <= 0.5x and wall time <= 1.0x of ``ds_to_universal``'s (default workers).

Usage::

    python benchmarks/universal.py                           # ~11 GB under /tmp
    python benchmarks/universal.py --layers 2 --width 256 --out /tmp/small.json   # a quick try
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

METHODS = ["zeroloop", "ds_to_universal", "ds_to_universal_1worker"]
TARGETS = {"peak_tree_rss": 0.5, "wall": 1.0}  # zeroloop / ds_to_universal (default workers), at most
SAMPLE_S = 0.02


def consolidate_benchmark():
    """benchmarks/consolidate.py, whose checkpoint this benchmark converts (imported by its
    file's name, so that the ranks it spawns find its functions too)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import consolidate

    return consolidate


def command(method: str, tag_dir: str, output: str) -> list[str]:
    if method == "zeroloop":
        return [sys.executable, "-m", "zeroloop", "universal", tag_dir, "--output", output]
    workers = ["--num_extract_workers", "1", "--num_merge_workers", "1"] if method.endswith("1worker") else []
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", tag_dir,
            "--output_folder", output, *workers]


def tree_rss_kib(root: int) -> int:
    """Resident memory of ``root`` and all its descendants, in KiB (0 once gone)."""
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                    stack += [int(child) for child in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def measure(method: str, tag_dir: str, output: str) -> dict:
    """Wall time (s), largest process's peak RSS and the tree's peak RSS (MiB) of one method."""
    shutil.rmtree(output, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    peak, done = [0], threading.Event()
    with open(output + ".log", "wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(command(method, tag_dir, output), stdout=log, stderr=subprocess.STDOUT, env=env)

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss_kib(proc.pid))
                done.wait(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
    ok = os.waitstatus_to_exitcode(status) == 0
    result = {"ok": ok, "wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
              "peak_tree_rss_mib": round(peak[0] / 1024, 1)}
    if not ok:
        with open(output + ".log", encoding="utf-8", errors="replace") as f:
            result["error"] = f.read()[-500:]
    return result


def outputs_identical(ours: str, theirs: str) -> dict:
    """Every parameter's fp32 and moments in both outputs, bit for bit."""
    import torch

    compared, different = 0, []
    for name in sorted(os.listdir(os.path.join(theirs, "zero"))):
        folder = os.path.join(theirs, "zero", name)
        if not os.path.isdir(folder):
            continue
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            a = torch.load(os.path.join(ours, "zero", name, f"{key}.pt"), mmap=True, weights_only=False)
            b = torch.load(os.path.join(folder, f"{key}.pt"), mmap=True, weights_only=False)
            a, b = (x["param"] if isinstance(x, dict) else x for x in (a, b))
            compared += 1
            if not torch.equal(a.reshape(-1), b.reshape(-1)):
                different.append(f"{name}/{key}")
    return {"tensors_compared": compared, "different": different, "identical": compared > 0 and not different}


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method: the fastest wall time, the largest peaks over the rounds."""
    summary = {}
    for method, results in runs.items():
        ok = [r for r in results if r["ok"]]
        if ok:
            summary[method] = {"ok": True, "wall_s": min(r["wall_s"] for r in ok),
                               "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
                               "peak_tree_rss_mib": max(r["peak_tree_rss_mib"] for r in ok), "runs": results}
        else:
            summary[method] = {"ok": False, "error": results[-1].get("error"), "runs": results}
    return summary


def ratios(summary: dict[str, dict]) -> dict[str, dict]:
    ours = summary["zeroloop"]
    return {f"zeroloop/{name}": {key: round(ours[f"{key}_mib" if key != "wall" else "wall_s"] /
                                            s[f"{key}_mib" if key != "wall" else "wall_s"], 3)
                                 for key in ("peak_rss", "peak_tree_rss", "wall")}
            for name, s in summary.items() if name != "zeroloop" and s["ok"] and ours["ok"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (min wall, max memory)")
    parser.add_argument("--tmp", default="/tmp", help="where the temporary checkpoint goes")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "universal_cpu.json"))
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="zeroloop-universal-", dir=args.tmp)
    try:
        checkpoint = os.path.join(work, "ckpt")
        started = time.perf_counter()
        params = consolidate_benchmark().make_checkpoint(checkpoint, args.layers, args.width, "fp32")
        with open(os.path.join(checkpoint, "latest"), encoding="utf-8") as f:
            tag_dir = os.path.join(checkpoint, f.read().strip())
        source_bytes = folder_bytes(tag_dir)
        print(f"checkpoint: {params / 1e6:.1f}M parameters, {source_bytes / 2**30:.2f} GiB, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        loads = []
        for round_ in range(args.rounds):
            for method in METHODS:  # interleaved, so the page cache and the machine's load treat all alike
                loads.append(os.getloadavg()[0])
                runs[method].append(measure(method, tag_dir, os.path.join(work, method)))
                print(round_, method, runs[method][-1], flush=True)
        summary = summarize(runs)
        identical = outputs_identical(os.path.join(work, "zeroloop"), os.path.join(work, "ds_to_universal")) \
            if summary["zeroloop"]["ok"] and summary["ds_to_universal"]["ok"] else None
        report = {
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(),
                        "load_average_1min": {"min": min(loads), "max": max(loads)}},
            "versions": versions(),
            "model": {"name": "zeroloop.gpt.GPT", "n_layer": args.layers, "n_embd": args.width,
                      "parameters": params},
            "checkpoint": {"zero_stage": 3, "world_size": 2, "precision": "fp32", "bytes": source_bytes},
            "output_bytes": {m: folder_bytes(os.path.join(work, m)) for m in METHODS if summary[m]["ok"]},
            "outputs_identical_to_ds_to_universal": identical,
            "methods": summary,
            "ratios": ratios(summary),
            "targets": {"vs": "ds_to_universal", **TARGETS},
        }
        vs = report["ratios"].get("zeroloop/ds_to_universal")
        report["targets"]["met"] = bool(vs and vs["peak_tree_rss"] <= TARGETS["peak_tree_rss"]
                                        and vs["wall"] <= TARGETS["wall"])
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(json.dumps({"ratios": report["ratios"], "targets": report["targets"],
                          "identical": identical}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def folder_bytes(path: str) -> int:
    """Bytes on disk under ``path``, a file with two names (a hard link) counted once."""
    sizes = {}
    for folder, _, files in os.walk(path):
        for name in files:
            stat = os.stat(os.path.join(folder, name))
            sizes[stat.st_ino] = stat.st_size
    return sum(sizes.values())


def versions() -> dict:
    import deepspeed
    import torch

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__}


if __name__ == "__main__":
    main()

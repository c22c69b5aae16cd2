"""Benchmark ``zeroloop consolidate`` against DeepSpeed's ``zero_to_fp32`` on one checkpoint.

Builds a ZeRO-3 checkpoint on 2 CPU ranks of a GPT (default: 24 layers, width 1024, tied
embedding, ~302M parameters; one optimizer step), then runs each method in its own
subprocess and records its wall time and peak RSS (``os.wait4``: the child's own
maximum resident set, in MiB). Methods:

- ``zeroloop``: ``python -m zeroloop consolidate CKPT OUT`` (safetensors).
- ``ds_cli_safetensors`` / ``ds_cli_bin``: the ``zero_to_fp32.py`` script DeepSpeed copies
  into the checkpoint, with and without ``--safe_serialization`` (its default
  ``--max_shard_size 5GB`` needs ``huggingface_hub``).
- ``ds_safetensors`` / ``ds_bin``: its ``convert_zero_checkpoint_to_fp32_state_dict`` with
  ``max_shard_size=None`` (one file, no ``huggingface_hub`` needed).
- ``ds_state_dict`` / ``ds_state_dict_lazy``: ``get_fp32_state_dict_from_zero_checkpoint``
  in memory, without and with ``lazy_mode`` (lazy tensors made real one at a time);
  nothing is written, so these are lower bounds for a writer built on them.

Ratios are zeroloop's number over each DeepSpeed method that succeeded. The outputs of
``zeroloop`` and ``ds_bin`` are compared tensor by tensor, bit for bit.

Usage::

    python benchmarks/consolidate.py                      # ~5 GB of checkpoint under /tmp
    python benchmarks/consolidate.py --layers 2 --width 256 --out /tmp/small.json   # a quick try

The checkpoint and outputs live in a temporary folder under ``--tmp`` (default /tmp) that
is deleted at the end.
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

METHODS = ["zeroloop", "ds_cli_safetensors", "ds_cli_bin", "ds_safetensors", "ds_bin", "ds_state_dict",
           "ds_state_dict_lazy"]
# ZeRO-3 buckets far below the defaults (reduce_bucket_size 5e8 elements is 2 GB of fp32 per
# rank), so that making the checkpoint fits beside other work; in elements. sub_group_size
# also gives each rank several flat fp32 groups, as large models have.
LEAN_ZERO3 = {"reduce_bucket_size": 2e7, "stage3_prefetch_bucket_size": 2e7,
              "stage3_max_live_parameters": 5e7, "stage3_max_reuse_distance": 5e7, "sub_group_size": 5e7}
TARGETS = {"peak_rss": 0.5, "wall": 1.0}  # zeroloop / DeepSpeed's working writer (ds_bin), at most


# --- the checkpoint ---------------------------------------------------------------------------


def save_checkpoint_rank(rank: int, path: str, layers: int, width: int, precision: str) -> int:
    """One rank: build the GPT, take one optimizer step, save a ZeRO-3 checkpoint to ``path``."""
    import deepspeed
    import torch

    from zeroloop import runtime
    from zeroloop.gpt import GPT
    from zeroloop.testing import tiny_config

    deepspeed.init_distributed()
    torch.manual_seed(0)
    model = GPT(n_layer=layers, n_head=max(1, width // 64), n_embd=width, block_size=16)
    config = tiny_config(stage=3, precision=precision, micro=1)
    config["zero_optimization"].update(LEAN_ZERO3)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    runtime.unlink_own_shm_buffer()
    del model
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(x, labels=x).loss)
    engine.step()
    engine.save_checkpoint(path)
    return sum(p.ds_numel for p in engine.module.parameters())


def make_checkpoint(path: str, layers: int, width: int, precision: str) -> int:
    from zeroloop.testing import run_ranks

    return run_ranks(save_checkpoint_rank, 2, path, layers, width, precision, timeout=1800)[0]


# --- the methods, each in its own process --------------------------------------------------


def command(method: str, checkpoint: str, output: str) -> list[str]:
    script = os.path.join(checkpoint, "zero_to_fp32.py")
    if method == "zeroloop":
        return [sys.executable, "-m", "zeroloop", "consolidate", checkpoint, output, "--no-progress"]
    if method == "ds_cli_safetensors":
        return [sys.executable, script, checkpoint, output, "--safe_serialization"]
    if method == "ds_cli_bin":
        return [sys.executable, script, checkpoint, output]
    return [sys.executable, os.path.abspath(__file__), "--child", method, checkpoint, output]


def run_child(method: str, checkpoint: str, output: str) -> None:
    """The in-process DeepSpeed methods (run as ``--child``)."""
    from deepspeed.utils import zero_to_fp32

    if method in ("ds_safetensors", "ds_bin"):
        zero_to_fp32.convert_zero_checkpoint_to_fp32_state_dict(
            checkpoint, output, max_shard_size=None, safe_serialization=method == "ds_safetensors")
    elif method == "ds_state_dict":
        state_dict = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(checkpoint)
        print(f"{len(state_dict)} tensors")
    elif method == "ds_state_dict_lazy":
        state_dict = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(checkpoint, lazy_mode=True)
        for name in list(state_dict):
            tensor = state_dict.pop(name).contiguous()
            del tensor
    else:
        raise SystemExit(f"unknown method {method}")


def measure(method: str, checkpoint: str, output: str) -> dict:
    """Wall time (s) and peak RSS (MiB) of one method in a fresh process."""
    shutil.rmtree(output, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    log_path = output + ".log"
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(command(method, checkpoint, output), stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"ok": proc.returncode == 0, "wall_s": round(wall, 2),
              "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}  # ru_maxrss is in KiB on Linux
    if not result["ok"]:
        result["error"] = error_line(log_path) or f"exit code {proc.returncode}"
    return result


def error_line(log_path: str) -> str | None:
    """The last line of a failed run's output that names an exception."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    found = [i for i, line in enumerate(lines) if "Error" in line]
    if not found:
        return None
    line = lines[found[-1]]
    if line.endswith(":") and found[-1] + 1 < len(lines):  # the message is on the next line
        line += " " + lines[found[-1] + 1]
    return line[:300]


# --- checks and the report -----------------------------------------------------------------------


def outputs_identical(ours: str, theirs_bin: str) -> bool:
    """zeroloop's safetensors against zero_to_fp32's .bin, tensor by tensor, bit for bit."""
    import torch

    from zeroloop.safetensors_io import load_state_dict

    mine = load_state_dict(ours)
    reference = torch.load(os.path.join(theirs_bin, "pytorch_model.bin"), mmap=True, weights_only=False)
    return mine.keys() == reference.keys() and all(torch.equal(mine[k], reference[k]) for k in reference)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method: the fastest wall time and the largest peak RSS over the repeats."""
    summary = {}
    for method, results in runs.items():
        ok = [r for r in results if r["ok"]]
        if ok:
            summary[method] = {"ok": True, "wall_s": min(r["wall_s"] for r in ok),
                               "peak_rss_mib": max(r["peak_rss_mib"] for r in ok), "runs": results}
        else:
            summary[method] = {"ok": False, "error": results[-1].get("error"), "runs": results}
    return summary


def ratios(summary: dict[str, dict]) -> dict[str, dict]:
    ours = summary["zeroloop"]
    return {f"zeroloop/{name}": {"peak_rss": round(ours["peak_rss_mib"] / s["peak_rss_mib"], 3),
                                 "wall": round(ours["wall_s"] / s["wall_s"], 3)}
            for name, s in summary.items() if name != "zeroloop" and s["ok"] and ours["ok"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--repeats", type=int, default=2, help="runs of each method (min wall, max RSS)")
    parser.add_argument("--tmp", default="/tmp", help="where the temporary checkpoint goes")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "consolidate_cpu.json"))
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "CHECKPOINT", "OUTPUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(*args.child)

    work = tempfile.mkdtemp(prefix="zeroloop-bench-", dir=args.tmp)
    try:
        checkpoint = os.path.join(work, "ckpt")
        started = time.perf_counter()
        params = make_checkpoint(checkpoint, args.layers, args.width, args.precision)
        print(f"checkpoint: {params / 1e6:.1f}M parameters, {folder_bytes(checkpoint) / 2**30:.2f} GiB, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for repeat in range(args.repeats):
            for method in METHODS:  # interleaved, so the page cache treats every method alike
                runs[method].append(measure(method, checkpoint, os.path.join(work, method)))
                print(repeat, method, runs[method][-1], flush=True)
        summary = summarize(runs)
        identical = outputs_identical(os.path.join(work, "zeroloop"), os.path.join(work, "ds_bin")) \
            if summary["zeroloop"]["ok"] and summary["ds_bin"]["ok"] else None
        report = {
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "versions": versions(),
            "model": {"name": "zeroloop.gpt.GPT", "n_layer": args.layers, "n_embd": args.width,
                      "tied_embedding": True, "parameters": params},
            "checkpoint": {"zero_stage": 3, "world_size": 2, "precision": args.precision,
                           "bytes": folder_bytes(checkpoint)},
            "output_bytes": folder_bytes(os.path.join(work, "zeroloop")),
            "outputs_identical_to_ds_bin": identical,
            "methods": summary,
            "ratios": ratios(summary),
            "targets": {"vs": "ds_bin", **TARGETS},
        }
        vs = report["ratios"].get("zeroloop/ds_bin")
        report["targets"]["met"] = bool(vs and vs["peak_rss"] <= TARGETS["peak_rss"]
                                        and vs["wall"] <= TARGETS["wall"])
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(json.dumps({"ratios": report["ratios"], "targets": report["targets"],
                          "outputs_identical_to_ds_bin": identical}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def versions() -> dict:
    import deepspeed
    import safetensors
    import torch

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "safetensors": safetensors.__version__}


if __name__ == "__main__":
    main()

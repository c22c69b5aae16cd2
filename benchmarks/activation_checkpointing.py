"""Activation memory and step time of the bundled GPT with and without checkpointing.

Each configuration (no checkpointing, then each backend) trains two steps in its own
subprocess, so one's memory high-water mark cannot hide another's. Activation memory is
the peak during a training step minus the memory at rest (parameters, gradients and
AdamW state, all allocated by a warm-up step first):

- GPU: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at rest.
- CPU: the process's peak RSS (``ru_maxrss``) minus its RSS at rest. glibc is told to
  serve every allocation above 64 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``), so freed
  activations go back to the system at once and RSS follows the live tensors.

Usage::

    python benchmarks/activation_checkpointing.py                      # CPU: ~2 minutes idle
    python benchmarks/activation_checkpointing.py --device cuda --steps 10 \
        --out benchmarks/results/activation_checkpointing_h100.json

Step time is measured in one more process, the configurations interleaved step by step
on one model (``handle.remove()`` between them), median per configuration. Checkpointing
must not change the model's numbers: each configuration's loss on the same batch and
weights is recorded and compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "activation_checkpointing_cpu.json")
# (label, backend, every); "none" trains without checkpointing.
CONFIGS = [("none", None, 1), ("torch", "torch", 1), ("deepspeed", "deepspeed", 1),
           ("torch-every-2", "torch", 2)]
DEFAULT_CONFIGS = "none,torch,deepspeed"  # torch-every-2 on request: it keeps half the blocks' activations
# Model sizes per device: 12 layers at sequence 512, where activations dominate.
SIZES = {"cpu": dict(n_embd=256, n_head=4, batch=2), "cuda": dict(n_embd=768, n_head=12, batch=8)}
MIB = 2 ** 20
TIMING = "timing"  # the --one value of the timing process


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--seq", type=int, default=512, help="sequence length, tokens")
    p.add_argument("--n-embd", type=int, help="width (default: 256 on CPU, 768 on CUDA)")
    p.add_argument("--n-head", type=int, help="attention heads (default: 4 on CPU, 12 on CUDA)")
    p.add_argument("--batch", type=int, help="sequences per step (default: 2 on CPU, 8 on CUDA)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration, after one warm-up")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help=f"comma-separated, of {', '.join(c[0] for c in CONFIGS)}; 'none' is required")
    p.add_argument("--out", default=DEFAULT_OUT, help="the results JSON")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = p.parse_args(argv)
    for key, value in SIZES[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# --- the measurements, each in its own process ------------------------------------------


class Bench:
    """The GPT, its AdamW optimizer and token batches, in a one-rank process group (the
    "deepspeed" backend configures itself through torch.distributed)."""

    def __init__(self, args):
        import torch

        from zeroloop.gpt import GPT

        torch.set_num_threads(args.threads)
        self.args = args
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        self.model = GPT(n_layer=args.layers, n_head=args.n_head, n_embd=args.n_embd,
                         block_size=args.seq).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(0, 256, (args.batch, args.seq + 1), generator=g).to(self.device)

    def checkpointing(self, label: str):
        """Apply configuration ``label``; returns the handle (None for "none")."""
        from zeroloop.activation import ActivationCheckpointing, apply
        from zeroloop.gpt import Block

        _, backend, every = next(c for c in CONFIGS if c[0] == label)
        if backend is None:
            return None
        ds_config = {"train_batch_size": self.args.batch}
        if backend == "deepspeed":
            ds_config["activation_checkpointing"] = {}
        return apply(self.model, ActivationCheckpointing(Block, backend=backend, every=every), ds_config)

    def step(self) -> float:
        """One training step on the same batch; returns the loss (waits for the device)."""
        loss = self.model(self.tokens[:, :-1], self.tokens[:, 1:]).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: part of "at rest"
        return loss.item()


def in_process_group(device_type: str, fn, labels: list[str]):
    """``fn()``, inside a one-rank process group (gloo on a CPU, the default on a GPU)
    when one of ``labels`` uses the "deepspeed" backend."""
    from zeroloop.testing import single_process

    if not any(next(c for c in CONFIGS if c[0] == label)[1] == "deepspeed" for label in labels):
        return fn()
    with single_process():
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if device_type == "cpu" else None)
        return fn()


def measure_memory(args) -> dict:
    """Activation memory of configuration ``args.one``: one warm-up step, one measured."""
    import torch

    bench = Bench(args)

    def run():
        handle = bench.checkpointing(args.one)
        bench.step()  # allocates gradients and AdamW state
        rest = memory_now(bench.device)
        if bench.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(bench.device)
        loss = bench.step()
        peak = memory_peak(bench.device)
        return {"label": args.one, "checkpointed": handle.names if handle else [], "loss": loss,
                "rest_mib": rest / MIB, "peak_mib": peak / MIB, "activation_mib": (peak - rest) / MIB}

    return in_process_group(bench.device.type, run, [args.one])


def measure_time(args) -> dict:
    """Step time of every configuration, interleaved round by round on one model (the
    handle removes the wrapping between them), so a shared machine's changing load
    falls on all of them alike. Median per configuration."""
    import torch

    bench = Bench(args)
    labels = args.configs.split(",")

    def run():
        # Wall seconds, and this process's CPU seconds (all threads): on a shared CPU the
        # second is less sensitive to other jobs taking the cores.
        times = {label: {"wall": [], "cpu": []} for label in labels}
        for round_ in range(args.steps + 1):  # round 0 warms up
            for label in labels:
                handle = bench.checkpointing(label)
                if bench.device.type == "cuda":
                    torch.cuda.synchronize(bench.device)
                wall, cpu = time.perf_counter(), time.process_time()
                bench.step()
                if round_:
                    times[label]["wall"].append(time.perf_counter() - wall)
                    times[label]["cpu"].append(time.process_time() - cpu)
                if handle is not None:
                    handle.remove()
        return times

    return in_process_group(bench.device.type, run, labels)


def memory_now(device) -> int:
    """Bytes in use now: allocated by torch on a GPU, resident on a CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


def memory_peak(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --- the driver ---------------------------------------------------------------------------


def run_all(args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(HERE), env.get("PYTHONPATH")]))
    if args.device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
    common = ["--device", args.device, "--layers", str(args.layers), "--seq", str(args.seq),
              "--n-embd", str(args.n_embd), "--n-head", str(args.n_head), "--batch", str(args.batch),
              "--steps", str(args.steps), "--threads", str(args.threads), "--configs", args.configs]

    def child(phase: str) -> dict:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", phase, *common],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{phase!r} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    results = []
    for label in args.configs.split(","):
        result = child(label)
        results.append(result)
        print(f"{label:>14}: activations {result['activation_mib']:.1f} MiB (peak {result['peak_mib']:.1f}, "
              f"rest {result['rest_mib']:.1f})", flush=True)
    times = child(TIMING)
    for result in results:
        measured = times[result["label"]]
        result["step_times_s"], result["step_cpu_times_s"] = measured["wall"], measured["cpu"]
        result["step_time_s"] = statistics.median(measured["wall"])
        result["step_cpu_time_s"] = statistics.median(measured["cpu"])
        print(f"{result['label']:>14}: step {result['step_time_s']:.3f} s wall, "
              f"{result['step_cpu_time_s']:.3f} s CPU (medians of {args.steps})", flush=True)
    return summarize(args, results)


def summarize(args, results: list[dict]) -> dict:
    import torch

    base = next(r for r in results if r["label"] == "none")
    for r in results:
        r["activation_memory_change_pct"] = 100.0 * (r["activation_mib"] / base["activation_mib"] - 1.0)
        r["step_time_change_pct"] = 100.0 * (r["step_time_s"] / base["step_time_s"] - 1.0)
        r["step_cpu_time_change_pct"] = 100.0 * (r["step_cpu_time_s"] / base["step_cpu_time_s"] - 1.0)
        # The fastest step is the one other jobs disturbed least: on a shared machine its
        # ratio is the better estimate of what checkpointing itself costs.
        r["step_time_min_change_pct"] = 100.0 * (min(r["step_times_s"]) / min(base["step_times_s"]) - 1.0)
        r["loss_diff_vs_none"] = abs(r["loss"] - base["loss"])  # the same batch and weights
        # The targets of issue 6: activation memory down >= 50%, step time up <= 40%.
        r["meets_targets"] = None if r is base else (r["activation_memory_change_pct"] <= -50.0
                                                     and r["step_time_change_pct"] <= 40.0)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    return {
        "model": {"layers": args.layers, "seq": args.seq, "n_embd": args.n_embd, "n_head": args.n_head,
                  "batch": args.batch, "dtype": "fp32", "optimizer": "AdamW"},
        "device": device, "threads": args.threads, "measured_steps": args.steps,
        # A shared machine's load makes CPU step times noisy; it is recorded with them.
        "load_average_1min": os.getloadavg()[0], "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(),
        "memory": "cuda max_memory_allocated - allocated at rest" if args.device == "cuda"
                  else "peak RSS (ru_maxrss) - RSS at rest, MALLOC_MMAP_THRESHOLD_=65536",
        "results": results,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure_time(args) if args.one == TIMING else measure_memory(args)))
        return
    started = time.perf_counter()
    report = run_all(args)
    report["wall_time_s"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    for r in report["results"][1:]:
        verdict = "met" if r["meets_targets"] else "NOT met"
        print(f"{r['label']:>14}: activations {r['activation_memory_change_pct']:+.0f}%, step time "
              f"{r['step_time_change_pct']:+.0f}% (fastest step {r['step_time_min_change_pct']:+.0f}%, CPU time "
              f"{r['step_cpu_time_change_pct']:+.0f}%), "
              f"targets {verdict}, loss diff {r['loss_diff_vs_none']:.2e}")
    print(f"wrote {args.out} in {report['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()

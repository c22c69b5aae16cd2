"""Throughput of the bundled GPT under TrainerLoop, and TrainerLoop's overhead.

Run it as one process (``python benchmarks/throughput.py``) or under the launcher
(``deepspeed --num_gpus 2 benchmarks/throughput.py``); every rank runs the same
configurations, rank 0 writes the JSON.

Figures per configuration (GPT size x ZeRO stage x precision):
- optimizer steps/s, samples/s and tokens/s over all ranks, after warm-up steps;
- model FLOP utilisation on a GPU: FLOPs per token = 6 N + 12 L H T (N parameters
  without position embeddings, L layers, H hidden size, T sequence length: PaLM's
  formula, attention included), over the peak of the device (989 TFLOP/s dense bf16 on
  an H100 SXM, 67 TFLOP/s fp32 non-tensor; override with --peak-tflops);
- peak memory per rank: ``torch.cuda.max_memory_allocated`` on a GPU, the largest RSS
  seen at step ends on a CPU.

Overhead (``--overhead``): TrainerLoop against a hand-written ``engine.backward/step``
loop on the same model, data and config, alternated round by round in one process; the
ratio of their median step times (target <= 1.02). ``--interleaved-overhead`` alternates
them step by step instead (a hand step runs in TrainerLoop's ``on_step_end`` on a second
engine), which keeps a shared machine's drift out of the ratio.

Uses the public API only, so it doubles as an example.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import psutil
import torch

import deepspeed
import zeroloop
from zeroloop import Hyperparameters, LogSettings, TrainerLoop, init_distributed, seed_everything, teardown
from zeroloop.corpus import ByteCorpus, read_corpus
from zeroloop.gpt import GPT, GPT_SIZES, GPTConfig

PEAK_TFLOPS = {("cuda", "bf16"): 989.0, ("cuda", "fp16"): 989.0, ("cuda", "fp32"): 67.0}


class TimedLoop(TrainerLoop):
    """Records the time (and the memory, if ``track_memory``) at every optimizer step."""

    track_memory = True

    def on_train_start(self):
        self.step_times = []
        self.peak_rss = 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, step, metrics):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_times.append(time.perf_counter())
        if self.track_memory:
            self.peak_rss = max(self.peak_rss, psutil.Process().memory_info().rss)


class StepTimer(TimedLoop):
    """Times steps exactly as the hand-written loop does (no memory probe)."""

    track_memory = False


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}},
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1_000_000,
    }


def count_parameters(model) -> int:
    """Distinct parameters, also once ZeRO-3 has partitioned them (numel 0, ds_numel full)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    model_params = sum(p.numel() for p in GPT(cfg).parameters()) - cfg.block_size * cfg.n_embd
    return 6 * model_params + 12 * cfg.n_layer * cfg.n_embd * seq_len


def build(size: str, seq_len: int, stage: int, precision: str, micro: int, steps: int, loop_class=TimedLoop):
    seed_everything(0)
    cfg = GPTConfig(block_size=seq_len, **GPT_SIZES[size])
    data = ByteCorpus(read_corpus(max_bytes=4_000_000), seq_len)
    loop = loop_class(GPT(cfg), ds_config(stage), train_data=data, output_dir=f"/tmp/zeroloop-bench/{size}",
                      max_steps=steps, hparams=Hyperparameters(micro_batch_size=micro, precision=precision),
                      log=LogSettings(every=max(1, steps), progress_bar=False))
    return loop, cfg


def measure(size, seq_len, stage, precision, micro, steps, warmup, device, peak_tflops):
    init_distributed()  # one group for every configuration of the run
    loop, cfg = build(size, seq_len, stage, precision, micro, steps)
    loop.train()
    times = loop.step_times[warmup:]
    seconds_per_step = (times[-1] - times[0]) / (len(times) - 1)
    world = loop.world_size
    samples_per_step = micro * world
    tokens_per_sec = samples_per_step * seq_len / seconds_per_step
    result = {
        "size": size, "parameters": count_parameters(loop.model), "stage": stage,
        "precision": precision, "world_size": world, "micro_batch": micro, "seq_len": seq_len,
        "steps_per_sec": 1 / seconds_per_step, "samples_per_sec": samples_per_step / seconds_per_step,
        "tokens_per_sec": tokens_per_sec, "peak_rss_gib": loop.peak_rss / 2**30,
    }
    if device == "cuda":
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peak = peak_tflops or PEAK_TFLOPS[("cuda", precision)]
        achieved = flops_per_token(cfg, seq_len) * tokens_per_sec / world
        result.update(mfu=achieved / (peak * 1e12), peak_tflops=peak, achieved_tflops_per_device=achieved / 1e12)
    return result


# --- overhead: TrainerLoop against a hand-written loop, alternated ------------------------------


def hand_loop_step_times(size, seq_len, stage, precision, micro, steps):
    """The loop people write by hand around the same engine settings."""
    loop, _ = build(size, seq_len, stage, precision, micro, steps, loop_class=TrainerLoop)
    engine = loop.setup()  # same resolved config, loader and engine
    times = []
    batches = iter(loop.train_batches.epoch(0))
    for _ in range(steps):
        batch = next(batches)
        ids, labels = batch["input_ids"].to(engine.device), batch["labels"].to(engine.device)
        loss = engine(ids, labels).loss
        engine.backward(loss)
        engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    engine.destroy()
    return times


def overhead(size, seq_len, stage, precision, micro, steps, warmup, rounds):
    init_distributed()
    per_step = {"zeroloop": [], "hand": []}
    for _ in range(rounds):
        loop, _ = build(size, seq_len, stage, precision, micro, steps, loop_class=StepTimer)
        loop.train()
        per_step["zeroloop"].append(median_step(loop.step_times[warmup:]))
        per_step["hand"].append(median_step(hand_loop_step_times(size, seq_len, stage, precision, micro,
                                                                 steps)[warmup:]))
    ratios = [z / h for z, h in zip(per_step["zeroloop"], per_step["hand"])]
    return {"size": size, "stage": stage, "precision": precision, "rounds": rounds,
            "zeroloop_s_per_step": per_step["zeroloop"], "hand_s_per_step": per_step["hand"],
            "ratio_per_round": ratios, "ratio_median": statistics.median(ratios)}


class Interleaved(TrainerLoop):
    """After each of its own optimizer steps, runs one hand-written step on a second engine.

    Both are then timed step by step under the same conditions, so the drift and noise of
    a shared machine hit them alike. The loop's interval runs from the end of one hand step
    to its next ``on_step_end``: everything TrainerLoop does per step is inside it.
    """

    hand_step = None  # () -> seconds of one hand-written step, set before train()

    def on_train_start(self):
        self.own_s, self.hand_s, self._resumed_at = [], [], None

    def on_step_end(self, step, metrics):
        now = synchronized_clock()
        if self._resumed_at is not None:
            self.own_s.append(now - self._resumed_at)
        self.hand_s.append(self.hand_step())
        self._resumed_at = synchronized_clock()


def synchronized_clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def hand_stepper(engine, loader):
    """One step of ``engine(ids, labels).loss; engine.backward(loss); engine.step()``, timed."""
    batches = iter(loader)

    def step() -> float:
        started = synchronized_clock()
        batch = next(batches)
        loss = engine(batch["input_ids"].to(engine.device), batch["labels"].to(engine.device)).loss
        engine.backward(loss)
        engine.step()
        return synchronized_clock() - started

    return step


def interleaved_overhead(size, seq_len, stage, precision, micro, steps, warmup):
    init_distributed()
    reference, _ = build(size, seq_len, stage, precision, micro, steps, loop_class=TrainerLoop)
    hand_engine = reference.setup()  # the same resolved config and loader, driven by hand
    loop, _ = build(size, seq_len, stage, precision, micro, steps, loop_class=Interleaved)
    loop.hand_step = hand_stepper(hand_engine, reference.train_batches.epoch(0))
    loop.train()
    hand_engine.destroy()
    own, hand = loop.own_s[warmup:], loop.hand_s[warmup + 1:]  # own_s starts at step 2
    return {"size": size, "stage": stage, "precision": precision, "steps": len(own),
            "zeroloop_median_s": statistics.median(own), "hand_median_s": statistics.median(hand),
            "ratio_of_medians": statistics.median(own) / statistics.median(hand),
            "ratio_of_means": statistics.fmean(own) / statistics.fmean(hand)}


def median_step(times):
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "zeroloop": zeroloop.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(GPT_SIZES))
    p.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--overhead", action="store_true", help="also measure TrainerLoop against a hand-written loop")
    p.add_argument("--overhead-rounds", type=int, default=3)
    p.add_argument("--interleaved-overhead", action="store_true",
                   help="TrainerLoop against a hand-written loop, alternated step by step in one run")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/throughput_<device>.json)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"machine": machine(), "throughput": [], "overhead": None}
    for size in args.sizes:
        for stage in args.stages:
            for precision in args.precisions:
                row = measure(size, args.seq_len, stage, precision, args.micro_batch, args.steps, args.warmup,
                              device, args.peak_tflops)
                results["throughput"].append(row)
                if int(os.environ.get("RANK", 0)) == 0:
                    print(json.dumps(row), flush=True)
    if args.overhead:
        results["overhead"] = overhead(args.sizes[0], args.seq_len, 2, args.precisions[0], args.micro_batch,
                                       args.steps, args.warmup, args.overhead_rounds)
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(results["overhead"]), flush=True)
    if args.interleaved_overhead:
        results["overhead_interleaved"] = interleaved_overhead(args.sizes[0], args.seq_len, 2, args.precisions[0],
                                                               args.micro_batch, args.steps, args.warmup)
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(results["overhead_interleaved"]), flush=True)
    if int(os.environ.get("RANK", 0)) == 0:
        out = args.out or os.path.join(os.path.dirname(__file__), "results", f"throughput_{device}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {out}")
    teardown(engine=None, destroy_process_group=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

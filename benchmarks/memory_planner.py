"""Measured against predicted: per-rank memory of ZeRO stages 0-3 next to ``zeroloop.plan``.

Trains two steps of a ~110M-parameter GPT (GPT_SIZES["medium"] with a 32k vocabulary) under
each stage and precision and measures, on every rank:

- ``census``: the bytes of every distinct tensor storage alive after the second backward
  or after the second step (the larger), found by
  walking the garbage collector's objects (model, optimizer state, ZeRO's flat buffers and
  buckets; on a GPU only CUDA tensors). Storages count whole, as a GPU allocates them.
- ``rss_peak_growth`` (CPU): peak resident memory (VmHWM, reset before the model is
  built) minus the resident memory before it: what the host really committed, with
  untouched bucket pages left out.
- ``cuda_peak`` (GPU): ``torch.cuda.max_memory_allocated`` over initialize + two steps.

Next to them the plan's prediction for the same model, world size and config:
``persistent`` (model states, plus ZeRO-3's reduce bucket: what is alive between steps) and
``peak`` (everything the plan counts, activations of the step included; on a CPU
with the buckets' touched part only).

Run:
    python benchmarks/memory_planner.py             # 2 CPU ranks (zeroloop.testing.run_ranks),
                                                    # or every GPU when there are GPUs
    deepspeed --num_gpus 2 benchmarks/memory_planner.py   # under a launcher (configs in turn)

Writes benchmarks/results/memory_planner_{cpu,gpu}.json and prints a table (GB = 1e9 bytes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zeroloop.gpt import GPT, GPT_SIZES, GPTConfig  # noqa: E402
from zeroloop.memory import plan  # noqa: E402
from zeroloop.sizes import GB  # noqa: E402

MODEL = dict(GPT_SIZES["medium"], vocab_size=32768, block_size=128)  # 110.2M parameters
MICRO_BATCH, SEQ_LEN = 2, 128
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def ds_config(stage: int, precision: str) -> dict:
    """Plain DeepSpeed defaults (5e8-element buckets), torch's AdamW (8 bytes/param of state)."""
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


# --- on every rank -----------------------------------------------------------------------------


def measure(rank: int, stage: int, precision: str) -> dict:
    """Build the model, ``deepspeed.initialize``, one step; return what this rank holds."""
    import deepspeed

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    deepspeed.init_distributed()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = status_kib("VmRSS")
    reset_peak_rss()
    started = time.perf_counter()
    torch.manual_seed(0)
    engine, _, _, _ = deepspeed.initialize(model=GPT(GPTConfig(**MODEL)), config=ds_config(stage, precision))
    tokens = torch.randint(0, MODEL["vocab_size"], (MICRO_BATCH, SEQ_LEN), device=engine.device)
    device_type = "cuda" if cuda else "cpu"
    engine.backward(engine(tokens, labels=tokens).loss)
    engine.step()  # creates the optimizer state
    engine.backward(engine(tokens, labels=tokens).loss)
    after_backward = tensor_census(device_type)  # gradients (and any kept buckets) alive too
    engine.step()
    after_step = tensor_census(device_type)
    result = {"rank": rank, "census": max(after_backward, after_step),
              "census_after_backward": after_backward, "census_after_step": after_step,
              "rss_peak_growth": (status_kib("VmHWM") - before) * 1024,
              "rss_growth_after_step": (status_kib("VmRSS") - before) * 1024,
              "seconds": round(time.perf_counter() - started, 1)}
    if cuda:
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
    engine.destroy()
    return result


def tensor_census(device_type: str) -> int:
    """Bytes of the distinct storages of every live tensor on ``device_type``."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() on deprecated torch.distributed objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        try:
            if tensor.device.type != device_type:
                continue
            storage = tensor.untyped_storage()
        except Exception:  # noqa: BLE001 - half-built or exotic tensors: not ones we own
            continue
        if storage.data_ptr():
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


# --- the prediction ----------------------------------------------------------------------------


def predict(stage: int, precision: str, world_size: int, on_gpu: bool) -> dict:
    """The plan's numbers for one run, bytes per rank."""
    model = GPT(GPTConfig(**MODEL))
    cfg = model.config
    result = plan(model, world_size=world_size, ds_config=ds_config(stage, precision),
                  micro_batch=MICRO_BATCH, seq_len=SEQ_LEN, hidden_size=cfg.n_embd, layers=cfg.n_layer)
    option = result[result.inputs.current]
    # Only ZeRO-3 keeps its reduce bucket between steps; ZeRO-1/2 allocate theirs for each
    # backward and DDP's flat copy lives for one all-reduce.
    kept_buckets = option.buffers if stage == 3 else 0
    lazy = option.buffers - option.buffers_touched
    return {"option": option.name, "params": result.inputs.params.total,
            "model_states": option.model_states, "fp32_grads": option.fp32_grads,
            "live_params": option.live_params, "buffers": option.buffers,
            "buffers_touched": option.buffers_touched, "activations": option.activations,
            "persistent": option.model_states + kept_buckets,
            "peak": option.device_total - (0 if on_gpu else lazy),
            "deepspeed_estimator": option.deepspeed_device, "warnings": list(result.warnings)}


# --- driving it --------------------------------------------------------------------------------


def run_all(stages, precisions, world_size: int, launched: bool) -> list[dict]:
    from zeroloop.testing import run_ranks

    rows = []
    for precision in precisions:
        for stage in stages:
            if launched:
                ranks = [measure(int(os.environ["RANK"]), stage, precision)]
            else:
                ranks = run_ranks(measure, world_size, stage, precision, timeout=600)
            rows.append(row(stage, precision, world_size, ranks))
            print(format_row(rows[-1]), flush=True)
    return rows


def row(stage: int, precision: str, world_size: int, ranks: list[dict]) -> dict:
    on_gpu = "cuda_peak" in ranks[0]
    predicted = predict(stage, precision, world_size, on_gpu)
    census = max(r["census"] for r in ranks)
    peak = max(r["cuda_peak"] if on_gpu else r["rss_peak_growth"] for r in ranks)
    return {"stage": stage, "precision": precision, "world_size": world_size, "ranks": ranks,
            "predicted": predicted, "census": census, "peak": peak,
            "ratio_census_to_persistent": round(census / predicted["persistent"], 3),
            "ratio_peak_to_predicted_peak": round(peak / predicted["peak"], 3)}


HEADER = (f"{'stage':>5} {'prec':>5} | {'states':>7} {'+bucket':>7} {'=pred':>7} {'census':>7} "
          f"{'ratio':>6} | {'pred pk':>7} {'peak':>7} {'ratio':>6} | {'DS est':>7}")


def format_row(r: dict) -> str:
    p = r["predicted"]

    def gb(x):
        return f"{x / GB:7.3f}" if x is not None else f"{'-':>7}"

    kept = p["persistent"] - p["model_states"]
    return (f"{r['stage']:>5} {r['precision']:>5} | {gb(p['model_states'])} {gb(kept)} {gb(p['persistent'])} "
            f"{gb(r['census'])} {r['ratio_census_to_persistent']:6.2f} | {gb(p['peak'])} {gb(r['peak'])} "
            f"{r['ratio_peak_to_predicted_peak']:6.2f} | {gb(p['deepspeed_estimator'])}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--world-size", type=int, default=None, help="ranks to spawn (default: GPUs, else 2)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: benchmarks/results/memory_planner_{cpu,gpu}.json)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    on_gpu = torch.cuda.is_available()
    world_size = int(os.environ["WORLD_SIZE"]) if launched else (
        args.world_size or (torch.cuda.device_count() if on_gpu else 2))
    print(f"GPT {MODEL}, micro-batch {MICRO_BATCH} x {SEQ_LEN} tokens, {world_size} "
          f"{'GPU' if on_gpu else 'CPU'} rank(s); GB = 1e9 bytes, per rank, max over ranks", flush=True)
    print(HEADER, flush=True)
    rows = run_all(args.stages, args.precisions, world_size, launched)
    if launched and int(os.environ["RANK"]) != 0:
        return 0
    out = args.out or os.path.join(RESULTS, f"memory_planner_{'gpu' if on_gpu else 'cpu'}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    device = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)"
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"model": MODEL, "micro_batch": MICRO_BATCH, "seq_len": SEQ_LEN, "device": device,
                   "launched": launched, "torch": torch.__version__, "units": "bytes", "rows": rows},
                  f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

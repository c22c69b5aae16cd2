"""TrainerLoop against plain PyTorch on one device: the same model, data and steps in one run.

Contenders (each a fresh process, one device, same bundled GPT, byte corpus, micro-batch,
sequence, AdamW lr 1e-4 without weight decay, gradient clipping 1.0, bf16 compute):

- ``pytorch``: the loop a PyTorch user writes: fp32 weights, ``torch.autocast(bf16)``,
  ``torch.optim.AdamW(fused=True)`` (fused on a GPU), ``clip_grad_norm_``;
- ``pytorch_compiled``: the same with ``torch.compile(model)``;
- ``zeroloop``: ``TrainerLoop`` at its defaults, ``Hyperparameters(precision="bf16")`` and a
  config with ``"bf16": {"enabled": "auto"}`` (zeroloop picks DeepSpeed's mode: docs/precision.md);
- ``zeroloop_compiled``: the same with ``compile=True`` (``engine.compile()``);
- ``zeroloop_bf16_mode``: ``TrainerLoop`` with ``"bf16": {"enabled": true}``, DeepSpeed's bf16 mode
  (bf16 weights, fp32 master in the optimizer);
- ``hand_autocast`` / ``hand_bf16_mode``: the hand-written ``deepspeed.initialize`` +
  ``engine.backward/step`` loop in DeepSpeed's torch_autocast / bf16 mode;
- ``hand_autocast_noclip``: the hand loop in torch_autocast without clipping (what
  DeepSpeed's clipping costs);
- ``hf_trainer``: Hugging Face ``Trainer`` + DeepSpeed (``bf16=True``, DeepSpeed's bf16 mode);
- ``lightning``: Lightning's ``DeepSpeedStrategy`` with ``precision="bf16-mixed"``.

The last two run when transformers / lightning are importable, else their row says so.

Timing: each contender synchronizes the device at the end of step ``warmup`` and of the
last step (a hook, as a user would add one) and nowhere else, so a loop that lets the CPU
run ahead of the device keeps that advantage; tokens/s = micro-batch x sequence x timed
steps / seconds. MFU = (6 N + 12 L H T) x tokens/s / peak (N parameters without position
embeddings; 989 TFLOP/s dense bf16 on an H100/H200 SXM, --peak-tflops to change it).
Rounds alternate the contenders in a rotated order; ratios are to ``pytorch`` in the same round.
Compiled contenders also report torch._dynamo's counters (graph breaks, unique graphs).

    python benchmarks/vs_pytorch.py                         # GPU: medium GPT, seq 1024, micro 16
    python benchmarks/vs_pytorch.py --device cpu --tiny     # smoke run on a CPU (minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
LR = 1e-4
CLIP = 1.0
PEAK_TFLOPS_BF16 = 989.0  # H100/H200 SXM dense bf16 (the vendor's datasheet)
TINY = dict(n_layer=2, n_head=2, n_embd=64)


@dataclasses.dataclass(frozen=True)
class Setup:
    size: str
    seq_len: int
    micro: int
    steps: int
    warmup: int
    stage: int
    device: str
    out_dir: str

    def gpt_config(self):
        from zeroloop.gpt import GPT_SIZES, GPTConfig

        shape = TINY if self.size == "tiny" else GPT_SIZES[self.size]
        return GPTConfig(block_size=self.seq_len, **shape)


def make_model(setup: Setup):
    from zeroloop.gpt import GPT

    torch.manual_seed(0)
    return GPT(setup.gpt_config())


def make_data(setup: Setup):
    from zeroloop.corpus import ByteCorpus, read_corpus

    samples = setup.micro * (setup.steps + 1)
    return ByteCorpus(read_corpus(max_bytes=samples * (setup.seq_len + 1) + 1), setup.seq_len)


def ds_config(setup: Setup, precision: dict, clip: float = CLIP) -> dict:
    return {"train_micro_batch_size_per_gpu": setup.micro, "gradient_accumulation_steps": 1,
            "gradient_clipping": clip, "steps_per_print": 1_000_000,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
            "zero_optimization": {"stage": setup.stage}, **precision}


AUTOCAST = {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
BF16_MODE = {"bf16": {"enabled": True}}


class StepClock:
    """Synchronizes and reads the clock at the end of step ``warmup`` and of step ``steps``."""

    def __init__(self, setup: Setup):
        self.warmup, self.steps = setup.warmup, setup.steps
        self.started = time.perf_counter()
        self.first_step_s = self.window_start = self.window_end = None

    def tick(self, step: int) -> None:
        if step not in (1, self.warmup, self.steps):
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step == 1:
            self.first_step_s = now - self.started
        if step == self.warmup:
            self.window_start = now
        if step == self.steps:
            self.window_end = now

    def result(self, setup: Setup) -> dict:
        seconds = self.window_end - self.window_start
        timed = self.steps - self.warmup
        return {"s_per_step": seconds / timed, "tokens_per_sec": setup.micro * setup.seq_len * timed / seconds,
                "first_step_s": self.first_step_s}


# --- contenders: each runs in its own process and returns its figures ------------------------


def run_pytorch(setup: Setup, compiled: bool = False) -> dict:
    device = torch.device(setup.device)
    model = make_model(setup).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=setup.device == "cuda")
    if compiled:
        model = torch.compile(model)
    loader = torch.utils.data.DataLoader(make_data(setup), batch_size=setup.micro, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    clock = StepClock(setup)
    for step, batch in enumerate(loader, start=1):
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        with torch.autocast(setup.device, dtype=torch.bfloat16):
            loss = model(ids, labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick(step)
        if step == setup.steps:
            break
    return {**clock.result(setup), "mode": "torch.autocast, fp32 weights"}


def run_pytorch_compiled(setup: Setup) -> dict:
    return run_pytorch(setup, compiled=True)


def run_zeroloop(setup: Setup, config: dict | None = None, **loop_kwargs) -> dict:
    from zeroloop import Hyperparameters, LogSettings, TrainerLoop
    from zeroloop.autocast import precision_mode

    clock = StepClock(setup)

    class Timed(TrainerLoop):
        def on_step_end(self, step, metrics):
            clock.tick(step)

    config = config or ds_config(setup, {"bf16": {"enabled": "auto"}})
    loop = Timed(make_model(setup), config, train_data=make_data(setup), output_dir=setup.out_dir,
                 max_steps=setup.steps, hparams=Hyperparameters(precision="bf16"),
                 log=LogSettings(every=setup.steps, progress_bar=False), **loop_kwargs)
    engine = loop.setup()
    clock.started = time.perf_counter()
    loop.train()
    return {**clock.result(setup), "mode": precision_mode(loop.ds_config),
            "compiled": bool(engine.is_compiled)}


def run_zeroloop_compiled(setup: Setup) -> dict:
    return run_zeroloop(setup, compile=True)


def run_zeroloop_bf16_mode(setup: Setup) -> dict:
    return run_zeroloop(setup, ds_config(setup, BF16_MODE))


def run_hand(setup: Setup, precision: dict = AUTOCAST, clip: float = CLIP) -> dict:
    import deepspeed
    from zeroloop.autocast import precision_mode
    from zeroloop.data import move_to_device

    deepspeed.init_distributed()
    model = make_model(setup)
    config = ds_config(setup, precision, clip)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    # bf16 mode wants bf16 float inputs; these batches are token ids only (nothing to cast).
    loader = torch.utils.data.DataLoader(make_data(setup), batch_size=setup.micro, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    clock = StepClock(setup)
    for step, batch in enumerate(loader, start=1):
        batch = move_to_device(batch, engine.device)
        loss = engine(batch["input_ids"], batch["labels"]).loss
        engine.backward(loss)
        engine.step()
        clock.tick(step)
        if step == setup.steps:
            break
    engine.destroy()
    return {**clock.result(setup), "mode": precision_mode(config)}


def run_hand_autocast(setup: Setup) -> dict:
    return run_hand(setup, AUTOCAST)


def run_hand_bf16_mode(setup: Setup) -> dict:
    return run_hand(setup, BF16_MODE)


def run_hand_autocast_noclip(setup: Setup) -> dict:
    return {**run_hand(setup, AUTOCAST, clip=0.0), "note": "gradient_clipping 0"}


class DictOutput(torch.nn.Module):
    """The bundled GPT with a dict output, as Hugging Face's Trainer reads ``outputs["loss"]``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels=None):
        out = self.model(input_ids, labels)
        return {"loss": out.loss, "logits": out.logits}


def run_hf_trainer(setup: Setup) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    if setup.device == "cpu":
        from compare import apply_hf_patches

        apply_hf_patches()
    clock = StepClock(setup)

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick(state.global_step)

    config = ds_config(setup, {"bf16": {"enabled": "auto"}})
    config["train_batch_size"] = setup.micro
    args = TrainingArguments(output_dir=setup.out_dir, per_device_train_batch_size=setup.micro,
                             max_steps=setup.steps, learning_rate=LR, weight_decay=0.0, max_grad_norm=CLIP,
                             lr_scheduler_type="constant", bf16=True, deepspeed=config, report_to=[],
                             save_strategy="no", logging_steps=setup.steps, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0, use_cpu=setup.device == "cpu")
    trainer = Trainer(model=DictOutput(make_model(setup)), args=args, train_dataset=make_data(setup),
                      callbacks=[Tick()])
    clock.started = time.perf_counter()
    trainer.train()
    return {**clock.result(setup), "mode": "bf16 (Trainer bf16=True)",
            "engine": type(trainer.model_wrapped).__name__}


def run_lightning(setup: Setup) -> dict:
    import lightning as L
    from lightning.pytorch.strategies import DeepSpeedStrategy

    clock = StepClock(setup)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_model(setup)

        def training_step(self, batch, batch_idx):
            return self.model(batch["input_ids"], batch["labels"]).loss

        def configure_optimizers(self):  # the config's optimizer section is used instead
            return None

    class Tick(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.tick(trainer.global_step)

    # Lightning sets the batch triad and the precision section itself.
    config = {k: v for k, v in ds_config(setup, {}).items()
              if k not in ("gradient_accumulation_steps", "train_batch_size")}
    if setup.device == "cpu":
        from compare import cpu_deepspeed_strategy

        strategy, accelerator = cpu_deepspeed_strategy(config), "cpu"
    else:
        strategy, accelerator = DeepSpeedStrategy(config=config), "gpu"
    loader = torch.utils.data.DataLoader(make_data(setup), batch_size=setup.micro, shuffle=True, drop_last=True)
    trainer = L.Trainer(accelerator=accelerator, devices=1, strategy=strategy, precision="bf16-mixed",
                        max_steps=setup.steps, gradient_clip_val=None, callbacks=[Tick()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=setup.out_dir)
    clock.started = time.perf_counter()
    trainer.fit(Module(), loader)
    return {**clock.result(setup), "mode": "bf16 (precision=\"bf16-mixed\")",
            "engine": type(strategy.deepspeed_engine).__name__}


CONTENDERS = {
    "pytorch": run_pytorch, "pytorch_compiled": run_pytorch_compiled,
    "zeroloop": run_zeroloop, "zeroloop_compiled": run_zeroloop_compiled,
    "zeroloop_bf16_mode": run_zeroloop_bf16_mode,
    "hand_autocast": run_hand_autocast, "hand_bf16_mode": run_hand_bf16_mode,
    "hand_autocast_noclip": run_hand_autocast_noclip,
    "hf_trainer": run_hf_trainer, "lightning": run_lightning,
}
NEEDS = {"hf_trainer": "transformers", "lightning": "lightning"}
COMPILED = ("pytorch_compiled", "zeroloop_compiled")


def contender_process(rank: int, name: str, setup: Setup) -> dict:
    """One contender in a fresh process (``run_ranks`` with one rank)."""
    sys.path.insert(0, HERE)  # compare.py's CPU patches
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = CONTENDERS[name](setup)
    if torch.cuda.is_available():
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if name in COMPILED:
        result["dynamo"] = dynamo_counters()
    return result


def dynamo_counters() -> dict:
    """What torch._dynamo saw: graph breaks (with reasons), unique graphs, recompilations."""
    from torch._dynamo.utils import counters

    breaks = counters.get("graph_break", {})
    return {"graph_breaks": int(sum(breaks.values())), "graph_break_reasons": [str(r)[:300] for r in list(breaks)[:10]],
            "stats": {k: int(v) for k, v in counters.get("stats", {}).items()},
            "recompiles": {str(k)[:300]: int(v) for k, v in list(counters.get("recompiles", {}).items())[:10]}}


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def flops_per_token(setup: Setup) -> float:
    cfg = setup.gpt_config()
    with torch.device("meta"):
        params = make_model(setup).num_parameters() - cfg.block_size * cfg.n_embd
    return 6 * params + 12 * cfg.n_layer * cfg.n_embd * setup.seq_len


def run_contender(name: str, setup: Setup, timeout: float) -> dict:
    from zeroloop.testing import RankFailure, run_ranks

    if name in NEEDS and not importable(NEEDS[name]):
        return {"error": f"{NEEDS[name]} is not importable here"}
    try:
        return run_ranks(contender_process, 1, name, setup, timeout=timeout, device=setup.device)[0]
    except RankFailure as error:
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "Exception" in line]
        return {"error": (errors or lines or ["?"])[-1].strip()[:500], "traceback": str(error)[-3000:]}


def summarize(per_round: dict[str, list[dict]], setup: Setup, peak: float | None) -> dict:
    rows = {}
    base = per_round.get("pytorch", [])
    flops = flops_per_token(setup)
    for name, runs in per_round.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows[name] = runs[0] if runs else {"error": "not run"}
            continue
        tokens = [r["tokens_per_sec"] for r in ok]
        row = {"tokens_per_sec_per_round": tokens, "tokens_per_sec": statistics.median(tokens),
               "mode": ok[0].get("mode"), "runs": ok}
        if peak:
            row["mfu"] = flops * row["tokens_per_sec"] / (peak * 1e12)
        pairs = [(r["tokens_per_sec"], b["tokens_per_sec"]) for r, b in zip(runs, base)
                 if "error" not in r and "error" not in b]
        if pairs:
            ratios = [t / b for t, b in pairs]
            row.update(ratio_to_pytorch_per_round=ratios, ratio_to_pytorch=statistics.median(ratios))
        rows[name] = row
    return rows


def print_table(rows: dict) -> None:
    print("| contender | mode | tokens/s | MFU | / pytorch |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        if "error" in row:
            print(f"| {name} | - | error: {row['error'][:120]} | - | - |")
            continue
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
        ratio = f"{row['ratio_to_pytorch']:.3f}" if "ratio_to_pytorch" in row else "-"
        print(f"| {name} | {row['mode']} | {row['tokens_per_sec']:,.0f} | {mfu} | {ratio} |")


def main(argv=None):
    sys.path.insert(0, HERE)
    from throughput import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--size", default="medium", choices=("tiny", "small", "medium", "large"))
    p.add_argument("--tiny", action="store_true", help="smoke run: a 2-layer GPT, seq 64, micro 4, 6 steps")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10, help="steps before the timed window")
    p.add_argument("--stage", type=int, default=0, help="ZeRO stage of the DeepSpeed contenders")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--peak-tflops", type=float, default=None, help=f"default {PEAK_TFLOPS_BF16} on a GPU")
    p.add_argument("--timeout", type=float, default=600, help="seconds per contender run")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/vs_pytorch_<device>.json)")
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.seq_len, args.micro_batch, args.steps, args.warmup = "tiny", 64, 4, 6, 2
    peak = args.peak_tflops or (PEAK_TFLOPS_BF16 if args.device == "cuda" else None)

    per_round: dict[str, list[dict]] = {name: [] for name in args.contenders}
    with tempfile.TemporaryDirectory() as out_root:
        setup = Setup(args.size, args.seq_len, args.micro_batch, args.steps, args.warmup, args.stage, args.device,
                      out_root)
        for round_ in range(args.rounds):
            shift = round_ % len(args.contenders)
            for name in args.contenders[shift:] + args.contenders[:shift]:
                result = run_contender(name, setup, args.timeout)
                per_round[name].append(result)
                shown = result.get("error") or f"{result['tokens_per_sec']:,.0f} tokens/s ({result.get('mode')})"
                print(f"round {round_} {name}: {shown}", flush=True)
    rows = summarize(per_round, setup, peak)
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    from compare import versions  # the same package list as the alternatives' comparison
    results = {"machine": machine(), "setup": {**dataclasses.asdict(setup), "out_dir": None},
               "parameters": sum(p.numel() for p in make_model(setup).parameters()),
               "flops_per_token": flops_per_token(setup), "peak_tflops": peak, "rounds": args.rounds,
               "load_average": os.getloadavg(), "versions": versions(), "contenders": rows}
    out = args.out or os.path.join(HERE, "results", f"vs_pytorch_{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print_table(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

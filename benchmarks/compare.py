"""zeroloop against the alternatives on the same model, data and config, as ratios in one run.

Contenders, each trained on 2 CPU ranks (gloo, ``OMP_NUM_THREADS=1`` per rank for all):
- ``zeroloop``: ``TrainerLoop`` with the DeepSpeed config below;
- ``hand``: the hand-written ``deepspeed.initialize`` + ``engine.backward/step`` loop
  (what the DeepSpeed-based contenders should approach);
- ``hf_trainer``: Hugging Face ``Trainer(args=TrainingArguments(deepspeed=config))``;
- ``lightning``: Lightning's ``DeepSpeedStrategy(config=config)``;
- ``ddp``: a plain PyTorch ``DistributedDataParallel`` loop with ``torch.optim.AdamW``
  (no DeepSpeed: the floor of what a data-parallel step costs here).

Same for all: a tiny ``transformers.GPT2LMHeadModel`` (built from a ``GPT2Config``, no
download; its forward returns ``.loss``), the same random token dataset, micro-batch,
steps, AdamW (lr 1e-4, no weight decay), gradient clipping 1.0, ZeRO-2, fp32.

Timing: every contender records ``time.perf_counter()`` at the end of each optimizer step
(a hook or callback, as a user would add one); the figure is the median step time after
the warm-up steps. Contenders alternate round by round, each run a fresh pair of processes
(``zeroloop.testing.run_ranks``), the order rotated each round, so machine noise spreads over
all of them. The ratio is
contender seconds per step over zeroloop's: above 1, zeroloop is faster.

Patches some contenders need to start on CPU ranks are listed in PATCHES and written into
the JSON; a contender that still fails records its error instead of a number.

    PYTHONPATH=. python benchmarks/compare.py [--rounds 3] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

MODEL = dict(vocab_size=256, n_positions=128, n_embd=128, n_layer=4, n_head=4)  # ~0.8M parameters
SEQ_LEN = 128
LR = 1e-4
CLIP = 1.0

PATCHES = {}  # contender -> what had to be patched for it to start here (filled below)


def ds_config(micro: int, world_size: int) -> dict:
    """The one DeepSpeed config every DeepSpeed-based contender gets, fully explicit."""
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "gradient_clipping": CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 1_000_000,
    }


def make_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**MODEL))


class TokenDataset(torch.utils.data.Dataset):
    """Random byte tokens; labels = inputs (GPT2LMHeadModel shifts them itself)."""

    def __init__(self, samples: int):
        seeded = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, MODEL["vocab_size"], (samples, SEQ_LEN), generator=seeded)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def distributed_loader(data, micro: int):
    """This rank's shuffled share of ``data`` (the process group must be up)."""
    sampler = torch.utils.data.DistributedSampler(data, shuffle=True, seed=0)
    return torch.utils.data.DataLoader(data, batch_size=micro, sampler=sampler)


# --- contenders: each runs on every rank and returns its step end times (rank 0's matter) -----


def run_zeroloop(rank, micro, steps, out_dir, health=None):
    from zeroloop import LogSettings, TrainerLoop

    class Timed(TrainerLoop):
        def on_train_start(self):
            self.times = []

        def on_step_end(self, step, metrics):
            self.times.append(time.perf_counter())

    loop = Timed(make_model(), ds_config(micro, 2), train_data=TokenDataset(micro * 2 * steps),
                 max_steps=steps, output_dir=out_dir, log=LogSettings(progress_bar=False, every=steps),
                 health=health)
    loop.train()
    return loop.times


def run_zeroloop_guard_off(rank, micro, steps, out_dir):
    """zeroloop without its non-finite-loss guard (an all-reduce of one flag per rank, every
    micro-batch): how much of zeroloop's difference to the hand loop that guard is."""
    from zeroloop import HealthPolicy

    return run_zeroloop(rank, micro, steps, out_dir, health=HealthPolicy(non_finite="off"))


def run_hand(rank, micro, steps, out_dir):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = make_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(micro, 2))
    # Our own loader: DeepSpeed's (training_data=) starts worker processes, which a run_ranks
    # rank (a daemon process) may not have.
    loader = distributed_loader(TokenDataset(micro * 2 * steps), micro)
    times = []
    for batch in loader:
        loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter())
        if len(times) == steps:
            break
    engine.destroy()
    return times


def run_hf_trainer(rank, micro, steps, out_dir):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    apply_hf_patches()

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    timer = StepTimes()
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=micro, max_steps=steps,
                             learning_rate=LR, weight_decay=0.0, max_grad_norm=CLIP,
                             lr_scheduler_type="constant",
                             deepspeed=ds_config(micro, 2), report_to=[], save_strategy="no",
                             logging_steps=steps, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=make_model(), args=args, train_dataset=TokenDataset(micro * 2 * steps),
                      callbacks=[timer])
    trainer.train()
    return timer.times


PATCHES["hf_trainer"] = (
    "accelerate.state.PartialState._prepare_backend: on ranks with LOCAL_RANK set and no GPU backend "
    "found it returns (None, NO) and accelerate counts 1 process, so the config's batch triad fails "
    "(train_batch_size 16 vs 8); patched to return ('gloo', MULTI_CPU), after which accelerate starts "
    "DeepSpeed's process group with gloo and counts 2 processes")


def apply_hf_patches():
    """Make accelerate pick gloo on CPU ranks under DeepSpeed (see PATCHES)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = original(self, cpu, sagemaker_dp, backend)
        if kind == DistributedType.NO and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return found, kind

    PartialState._prepare_backend = prepare_backend


PATCHES["lightning"] = (
    "lightning.pytorch.strategies.DeepSpeedStrategy.setup_environment raises 'The DeepSpeed strategy is "
    "only supported on CUDA GPUs but `CPUAccelerator` is used.'; a subclass skips that check and runs "
    "the parent DDPStrategy.setup_environment; its setup_distributed then refuses CPU devices ('The selected "
    "device indices [None, None] don't match the local rank values of processes'), so the subclass also "
    "runs setup_distributed without that device-index check; and Lightning hands deepspeed.initialize "
    "args.device_rank = root_device.index, None for a CPU device (DeepSpeed: \"'>=' not supported between "
    "'NoneType' and 'int'\"), so the subclass's root_device is torch.device('cpu', local_rank)")


def cpu_deepspeed_strategy(config: dict):
    """Lightning's DeepSpeedStrategy, made to start on CPU ranks (see PATCHES)."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        def setup_environment(self):  # the CUDA-only check skipped
            DDPStrategy.setup_environment(self)

        def setup_distributed(self):  # the same, without the GPU device-index check
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        @property
        def root_device(self):  # an index, which DeepSpeed reads as the device rank
            return torch.device("cpu", self.local_rank)

    return CPUDeepSpeedStrategy(config=config)


def run_lightning(rank, micro, steps, out_dir):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_model()

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):  # the config's optimizer section is used instead
            return None

    class StepTimes(L.Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter())

    # Lightning refuses gradient_accumulation_steps (and sets train_batch_size) in the config
    # itself from accumulate_grad_batches=1 and the loader: same values, its way.
    config = {k: v for k, v in ds_config(micro, 2).items() if k not in ("gradient_accumulation_steps",
                                                                          "train_batch_size")}
    timer = StepTimes()
    loader = torch.utils.data.DataLoader(TokenDataset(micro * 2 * steps), batch_size=micro)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=cpu_deepspeed_strategy(config),
                        max_steps=steps, callbacks=[timer], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out_dir)
    trainer.fit(Module(), loader)
    return timer.times


def run_ddp(rank, micro, steps, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    model = DistributedDataParallel(make_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    loader = distributed_loader(TokenDataset(micro * 2 * steps), micro)
    times = []
    for batch in loader:
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        times.append(time.perf_counter())
        if len(times) == steps:
            break
    dist.destroy_process_group()
    return times


CONTENDERS = {"zeroloop": run_zeroloop, "hand": run_hand, "hf_trainer": run_hf_trainer,
              "lightning": run_lightning, "ddp": run_ddp}
EXTRA = {"zeroloop_guard_off": run_zeroloop_guard_off}  # only when named with --contenders


# --- the run ----------------------------------------------------------------------------------


def median_step(times: list[float], warmup: int) -> float:
    kept = times[warmup:]
    return statistics.median(b - a for a, b in zip(kept, kept[1:]))


def run_contender(name, micro, steps, out_root) -> dict:
    """One 2-rank run: seconds per step (rank 0), or the error that stopped it."""
    from zeroloop.testing import RankFailure, run_ranks

    try:
        fn = {**CONTENDERS, **EXTRA}[name]
        times = run_ranks(fn, 2, micro, steps, os.path.join(out_root, name), timeout=300)[0]
        return {"times": times}
    except RankFailure as error:
        return {"error": last_error_line(str(error)), "traceback": str(error)[-4000:]}


def last_error_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    return (errors or lines or ["?"])[-1].strip()


def main(argv=None):
    import tempfile

    sys.path.insert(0, HERE)
    from throughput import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=[*CONTENDERS, *EXTRA])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--out", default=os.path.join(HERE, "results", "compare_cpu.json"))
    args = p.parse_args(argv)

    per_round = {name: [] for name in args.contenders}
    errors = {}
    with tempfile.TemporaryDirectory() as out_root:
        for round_ in range(args.rounds):
            shift = round_ % len(args.contenders)  # a different contender first in each round
            for name in args.contenders[shift:] + args.contenders[:shift]:
                if name in errors:
                    continue
                result = run_contender(name, args.micro_batch, args.steps, out_root)
                if "error" not in result and len(result["times"]) < args.warmup + 2:
                    result = {"error": f"only {len(result['times'])} step times recorded", "traceback": ""}
                if "error" in result:
                    errors[name] = result
                    print(f"round {round_} {name}: FAILED {result['error']}", flush=True)
                    continue
                per_round[name].append(median_step(result["times"], args.warmup))
                print(f"round {round_} {name}: {per_round[name][-1] * 1e3:.1f} ms/step", flush=True)

    results = {"machine": machine(), "model": f"GPT2LMHeadModel {MODEL}", "seq_len": SEQ_LEN,
               "world_size": 2, "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup,
               "rounds": args.rounds, "config": ds_config(args.micro_batch, 2), "patches": PATCHES,
               "versions": versions(), "contenders": {}}
    base = per_round.get("zeroloop") or []
    for name in args.contenders:
        if name in errors:
            results["contenders"][name] = errors[name]
            continue
        median = statistics.median(per_round[name])
        row = {"s_per_step_per_round": per_round[name], "median_s_per_step": median,
               "steps_per_sec": 1 / median}
        if base:  # the ratio per round, zeroloop's run of the same round as the base
            ratios = [c / z for c, z in zip(per_round[name], base)]
            row.update(ratio_to_zeroloop_per_round=ratios, ratio_to_zeroloop=statistics.median(ratios))
        results["contenders"][name] = row
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    ratios = {n: r.get("ratio_to_zeroloop", r.get("error")) for n, r in results["contenders"].items()}
    print(json.dumps(ratios))
    print(f"wrote {args.out}")


def versions() -> dict:
    found = {}
    for package in ("transformers", "accelerate", "lightning", "deepspeed", "torch"):
        try:
            found[package] = __import__(package).__version__
        except Exception as error:  # noqa: BLE001 - a missing optional contender
            found[package] = f"not importable: {error}"
    return found


if __name__ == "__main__":
    main()

"""What the non-finite loss check costs per optimizer step, its arms interleaved in one run.

One TrainerLoop trains the bundled GPT and, at each optimizer step, hands the check to the
next arm in turn, so the drift of a shared machine hits every arm alike:

- ``off``: no check (``HealthPolicy(non_finite="off")``);
- ``local``: each rank looks at its own losses once per optimizer step, no collective (what
  policy "raise" did before: the other ranks then died in their next collective);
- ``raise``: zeroloop's policy "raise": one all-reduce of a (world size x 2) tensor per
  optimizer step, so that every rank stops with the same error;
- ``skip``: policy "skip": one all-reduce per micro-batch.

Reports each arm's median step time and its ratio to ``off``, and the median time spent in
the check itself per step (its collective included) as a share of the ``off`` step: on a
loaded shared machine the step ratios move by several percent from noise alone, the check's
own time much less. Run under the launcher for 2 CPU ranks:

    deepspeed --num_gpus 2 benchmarks/non_finite_check.py --steps 400 --accum 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from throughput import machine, synchronized_clock
from zeroloop import HealthPolicy, Hyperparameters, LogSettings, TrainerLoop, init_distributed, seed_everything, teardown
from zeroloop.corpus import ByteCorpus, read_corpus
from zeroloop.gpt import GPT, GPT_SIZES, GPTConfig
from zeroloop.precision import NonFiniteGuard, non_finite_guard

ARMS = ("off", "local", "raise", "skip")


class LocalLook(NonFiniteGuard):
    """The check without a collective: each rank looks at its own losses once per step."""

    def __init__(self, policy, rank):
        super().__init__(policy, rank)
        self.pending = []

    def should_skip(self, loss, step, batch_index, epoch):
        self.pending.append(~torch.isfinite(loss.detach()))
        return False

    def check_step(self, step):
        pending, self.pending = self.pending, []
        if pending and torch.stack(pending).any().item():
            raise RuntimeError(f"non-finite loss at step {step} on rank {self.rank}")


class Timed(NonFiniteGuard):
    """Times what a guard does within a step: its look at each loss and its end-of-step check
    (the collective included, with any wait for the other rank). On a CPU every op is
    synchronous, so this is the check's own cost; on a GPU the end-of-step sync would also
    wait for the step's queued kernels."""

    def __init__(self, inner: NonFiniteGuard):
        super().__init__(inner.policy, inner.rank)
        self.inner, self.spent = inner, 0.0

    @property
    def skipped(self):
        return self.inner.skipped

    @skipped.setter
    def skipped(self, value):
        pass  # NonFiniteGuard.__init__ sets it; the inner guard keeps the count

    def should_skip(self, loss, step, batch_index, epoch):
        started = time.perf_counter()
        try:
            return self.inner.should_skip(loss, step, batch_index, epoch)
        finally:
            self.spent += time.perf_counter() - started

    def check_step(self, step):
        started = time.perf_counter()
        try:
            self.inner.check_step(step)
        finally:
            self.spent += time.perf_counter() - started


class Rotating(TrainerLoop):
    """Switches the non-finite check between the arms at every optimizer step and times each step."""

    def on_train_start(self):
        device = self.engine.device
        self.guards = {
            "off": None,
            "local": Timed(LocalLook(self.health, self.rank)),
            "raise": Timed(non_finite_guard(HealthPolicy(non_finite="raise"), self.rank, self.world_size, device)),
            "skip": Timed(non_finite_guard(HealthPolicy(non_finite="skip"), self.rank, self.world_size, device)),
        }
        self.seconds = {arm: [] for arm in ARMS}
        self.check_seconds = {arm: [] for arm in ARMS}
        self.arm, self.started = ARMS[0], synchronized_clock()
        self._nonfinite = self.guards[self.arm]

    def on_step_end(self, step, metrics):
        now = synchronized_clock()
        self.seconds[self.arm].append(now - self.started)
        guard = self.guards[self.arm]
        self.check_seconds[self.arm].append(guard.spent if guard else 0.0)
        if guard:
            guard.spent = 0.0
        self.arm = ARMS[step % len(ARMS)]
        self._nonfinite = self.guards[self.arm]
        self.started = synchronized_clock()


def measure(size: str, seq_len: int, micro: int, accum: int, steps: int, warmup: int) -> dict:
    init_distributed()
    seed_everything(0)
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
              "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
              "zero_optimization": {"stage": 2}, "steps_per_print": 1_000_000}
    data = ByteCorpus(read_corpus(max_bytes=4_000_000), seq_len)
    loop = Rotating(GPT(GPTConfig(block_size=seq_len, **GPT_SIZES[size])), config, train_data=data,
                    output_dir=f"/tmp/zeroloop-bench/non-finite-{size}", max_steps=steps,
                    hparams=Hyperparameters(precision="fp32"), log=LogSettings(every=steps, progress_bar=False))
    load_before = os.getloadavg()
    started = time.perf_counter()
    loop.train()
    skip = warmup // len(ARMS)
    medians = {arm: statistics.median(s[skip:-1] or s) for arm, s in loop.seconds.items()}  # last: logging step
    check = {arm: statistics.median(s[skip:-1] or s) for arm, s in loop.check_seconds.items()}
    return {
        "size": size, "seq_len": seq_len, "micro_batch": micro, "gradient_accumulation_steps": accum,
        "world_size": loop.world_size, "steps": steps, "warmup_steps_left_out": skip * len(ARMS),
        "steps_per_arm": {arm: len(s[skip:-1]) for arm, s in loop.seconds.items()},
        "median_s_per_step": medians,
        "ratio_to_off": {arm: medians[arm] / medians["off"] for arm in ARMS},
        "median_check_s_per_step": check,
        "check_share_of_off_step": {arm: check[arm] / medians["off"] for arm in ARMS},
        "wall_s": time.perf_counter() - started,
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=list(GPT_SIZES))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accum", type=int, nargs="+", default=[1, 4], help="gradient accumulation steps to run")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run (shared by the arms)")
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the timing")
    p.add_argument("--out", default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    given = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    command = f"deepspeed --num_gpus {int(os.environ.get('WORLD_SIZE', 1))} benchmarks/non_finite_check.py " \
        + " ".join(given)
    results = {"machine": machine(), "command": command.strip(), "arms": list(ARMS), "runs": []}
    rank0 = int(os.environ.get("RANK", 0)) == 0
    for accum in args.accum:
        run = measure(args.size, args.seq_len, args.micro_batch, accum, args.steps, args.warmup)
        results["runs"].append(run)
        if rank0:
            print(json.dumps(run), flush=True)
    if rank0:
        out = args.out or os.path.join(os.path.dirname(__file__), "results", f"non_finite_check_{device}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {out}")
    teardown(engine=None, destroy_process_group=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

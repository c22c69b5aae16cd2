"""A long 2-rank training that only a stop request ends, for the preemption tests.

Each rank writes ``ready_rank<r>.json`` (its pid) after its first optimizer step, and
``rank<r>.json`` (the steps trained) when ``train()`` has returned. ``--workers N`` reads the
data through a DataLoader with N worker processes.
"""

import json
import os

from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from tiny_task import script_arguments, tiny_regression
from zeroloop import LogSettings, TrainerLoop
from zeroloop.checkpoint import CheckpointSettings
from zeroloop.testing import tiny_config

MAX_STEPS = 1_000_000  # far more than any test waits for


class ReportingLoop(TrainerLoop):
    def on_step_end(self, step, metrics):
        if step == 1:
            write_json(os.path.join(self.output_dir, f"ready_rank{self.rank}.json"), {"pid": os.getpid()})


def write_json(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)  # the test never reads half a file


def main():
    args = script_arguments(("--workers", {"type": int, "default": 0}))
    model, data = tiny_regression()
    if args.workers:
        sampler = DistributedSampler(data, num_replicas=int(os.environ["WORLD_SIZE"]), rank=int(os.environ["RANK"]))
        data = DataLoader(data, batch_size=2, sampler=sampler, num_workers=args.workers, persistent_workers=True)
    loop = ReportingLoop(model, tiny_config(stage=2), train_data=data, loss_fn=nn.functional.mse_loss,
                         output_dir=args.out, max_steps=MAX_STEPS,
                         log=LogSettings(every=1000, progress_bar=False), checkpoint=CheckpointSettings())
    summary = loop.train()
    write_json(os.path.join(args.out, f"rank{loop.rank}.json"), {"steps": summary.steps, "pid": os.getpid()})


if __name__ == "__main__":
    main()

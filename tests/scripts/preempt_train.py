"""A long 2-rank training that only a stop request ends, for the preemption tests.

Each rank writes ``ready_rank<r>.json`` (its pid) after its first optimizer step, and
``rank<r>.json`` (the steps trained) when ``train()`` has returned. ``--workers N`` reads the
data through a DataLoader with N worker processes.
"""

import argparse
import json
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from zeroloop import LogSettings, TrainerLoop, seed_everything
from zeroloop.checkpoint import CheckpointSettings
from zeroloop.testing import tiny_config

MAX_STEPS = 1_000_000  # far more than any test waits for


class ReportingLoop(TrainerLoop):
    def __init__(self, *args, out, **kwargs):
        super().__init__(*args, **kwargs)
        self.out = out

    def on_step_end(self, step, metrics):
        if step == 1:
            write_json(os.path.join(self.out, f"ready_rank{self.rank}.json"), {"pid": os.getpid()})


def write_json(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)  # the test never reads half a file


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=0)
    args, _ = parser.parse_known_args()  # the deepspeed launcher adds --local_rank

    seed_everything(0)
    x = torch.randn(64, 8)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True))
    if args.workers:
        sampler = DistributedSampler(data, num_replicas=int(os.environ["WORLD_SIZE"]), rank=int(os.environ["RANK"]))
        data = DataLoader(data, batch_size=2, sampler=sampler, num_workers=args.workers, persistent_workers=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    loop = ReportingLoop(model, tiny_config(stage=2), train_data=data, loss_fn=nn.functional.mse_loss,
                         output_dir=args.out, max_steps=MAX_STEPS, out=args.out,
                         log=LogSettings(every=1000, progress_bar=False), checkpoint=CheckpointSettings())
    summary = loop.train()
    write_json(os.path.join(args.out, f"rank{loop.rank}.json"), {"steps": summary.steps, "pid": os.getpid()})


if __name__ == "__main__":
    main()

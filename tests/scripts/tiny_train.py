"""A user's training script, unchanged under python, deepspeed and torchrun."""

import argparse
import json
import os

import torch
from torch import nn
from torch.utils.data import TensorDataset

from zeroloop import LogSettings, TrainerLoop, seed_everything
from zeroloop.testing import tiny_config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, default=2)
    args, _ = parser.parse_known_args()  # the deepspeed launcher adds --local_rank

    seed_everything(0)
    x = torch.randn(64, 8)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True))
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    loop = TrainerLoop(model, tiny_config(stage=args.stage), train_data=data, loss_fn=nn.functional.mse_loss,
                       output_dir=args.out, max_steps=4, log=LogSettings(every=1, progress_bar=False))
    summary = loop.train()
    report = {"losses": [h["loss"] for h in summary.history], "world_size": loop.world_size,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    with open(os.path.join(args.out, f"rank{loop.rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()

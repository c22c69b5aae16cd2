"""A training script that fails at a chosen point, for the /dev/shm checks under a launcher.

    --fail config     a ConfigError before deepspeed.initialize (the process group is up)
    --fail scheduler  an unknown scheduler type in the config
    --fail monitor    a monitor whose package is not installed (wandb)
    --fail optimizer  a client optimizer factory that raises, inside deepspeed.initialize
    --fail resume     a resume path that does not exist, after deepspeed.initialize
    --fail step       compute_loss raises at the second micro-batch, inside the training loop
"""

import argparse

import torch
from torch import nn
from torch.utils.data import TensorDataset

from zeroloop import LogSettings, TrainerLoop, seed_everything
from zeroloop.checkpoint import CheckpointSettings
from zeroloop.testing import tiny_config

FAILURES = ("config", "scheduler", "monitor", "optimizer", "resume", "step")


def raising_optimizer(params):
    raise RuntimeError("the client optimizer factory failed on purpose")


class FailingLoop(TrainerLoop):
    def compute_loss(self, batch):
        if self.engine.global_steps >= 1:
            raise RuntimeError("compute_loss failed on purpose")
        return super().compute_loss(batch)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--fail", choices=FAILURES, required=True)
    args, _ = parser.parse_known_args()  # the deepspeed launcher adds --local_rank

    seed_everything(0)
    x = torch.randn(64, 8)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True))
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    config = tiny_config(stage=2)
    kwargs = {}
    if args.fail == "config":
        kwargs["optimizer"] = torch.optim.SGD  # and the config's "optimizer" section: refused
    elif args.fail == "scheduler":
        config["scheduler"] = {"type": "WarmupCosine", "params": {}}
    elif args.fail == "monitor":
        config["wandb"] = {"enabled": True, "project": "zeroloop-test"}
    elif args.fail == "optimizer":
        del config["optimizer"]
        kwargs["optimizer"] = raising_optimizer
    elif args.fail == "resume":
        kwargs["checkpoint"] = CheckpointSettings(resume=args.out + "/no-such-checkpoint")
    loop = FailingLoop(model, config, train_data=data, loss_fn=nn.functional.mse_loss, output_dir=args.out,
                       max_steps=4, log=LogSettings(every=1, progress_bar=False), **kwargs)
    loop.train()


if __name__ == "__main__":
    main()

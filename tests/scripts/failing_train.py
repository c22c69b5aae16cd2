"""A training script that fails at a chosen point, for the /dev/shm checks under a launcher.

    --fail config     a ConfigError before deepspeed.initialize (the process group is up)
    --fail scheduler  an unknown scheduler type in the config
    --fail monitor    a monitor whose package is not installed (wandb)
    --fail optimizer  a client optimizer factory that raises, inside deepspeed.initialize
    --fail resume     a resume path that does not exist, after deepspeed.initialize
    --fail step       compute_loss raises at the second micro-batch, inside the training loop
"""

import torch
from torch import nn

from tiny_task import script_arguments, tiny_regression
from zeroloop import LogSettings, TrainerLoop
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
    args = script_arguments(("--fail", {"choices": FAILURES, "required": True}))
    model, data = tiny_regression()
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

"""A user's training script, unchanged under python, deepspeed and torchrun."""

import json
import os

from torch import nn

from tiny_task import script_arguments, tiny_regression
from zeroloop import LogSettings, TrainerLoop
from zeroloop.testing import tiny_config


def main():
    args = script_arguments(("--stage", {"type": int, "default": 2}))
    model, data = tiny_regression()
    loop = TrainerLoop(model, tiny_config(stage=args.stage), train_data=data, loss_fn=nn.functional.mse_loss,
                       output_dir=args.out, max_steps=4, log=LogSettings(every=1, progress_bar=False))
    summary = loop.train()
    report = {"losses": [h["loss"] for h in summary.history], "world_size": loop.world_size,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    with open(os.path.join(args.out, f"rank{loop.rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()

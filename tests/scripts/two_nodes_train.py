"""One rank of a 2-machine run simulated on one machine (torchrun --nnodes 2 --node_rank N).

``--phase first``: a straight run, and the same run stopped at step 5, once with a shared
checkpoint folder and once with DeepSpeed's node-local storage, each machine writing to a
folder of its own (``<out>/node<N>``). ``--phase resume``: both stopped runs resumed, in new
processes. Each phase writes ``<out>/<phase>_rank<R>.json``.
"""

import argparse
import json
import os

import torch
from torch import nn

from zeroloop import LogSettings, TrainerLoop, runtime
from zeroloop.checkpoint import CheckpointSettings
from zeroloop.testing import full_parameters, tiny_config

STEPS, STOP_AT = 8, 5


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 8, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Loop(TrainerLoop):
    def on_step_end(self, step, metrics):
        if step == STOP_AT and self.stop:
            self.checkpointer.request_stop()

    def on_train_end(self, summary):
        self.weights = {name: value.tolist() for name, value in full_parameters(self.engine).items()}


def train(output_dir, node_local=False, checkpoint=True, stop=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    config = tiny_config(stage=2, lr=1e-2)
    if node_local:
        config["checkpoint"] = {"use_node_local_storage": True}
    loop = Loop(model, config, train_data=Data(), loss_fn=nn.functional.mse_loss, output_dir=output_dir,
                max_steps=STEPS, seed=3, log=LogSettings(every=1, progress_bar=False),
                checkpoint=CheckpointSettings(every=2) if checkpoint else None)
    loop.stop = stop
    summary = loop.train()
    return {"losses": [record["loss"] for record in summary.history], "steps": summary.steps,
            "weights": loop.weights}


def main():
    import deepspeed

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--phase", choices=("first", "resume"), required=True)
    args, _ = parser.parse_known_args()
    deepspeed.init_distributed()  # one process group for every loop of the phase
    rank, node = int(os.environ["RANK"]), int(os.environ["GROUP_RANK"])
    shared, own = os.path.join(args.out, "shared"), os.path.join(args.out, f"node{node}")
    if args.phase == "first":
        result = {"straight": train(os.path.join(args.out, "straight"), checkpoint=False),
                  "shared": train(shared, stop=True), "node_local": train(own, node_local=True, stop=True)}
    else:
        result = {"shared": train(shared), "node_local": train(own, node_local=True)}
    result["env"] = {key: os.environ.get(key) for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    with open(os.path.join(args.out, f"{args.phase}_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    runtime.teardown(None, destroy_process_group=True)


if __name__ == "__main__":
    main()

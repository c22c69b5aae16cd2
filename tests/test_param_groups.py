"""Parameter groups: no weight decay on biases and normalization weights, in the engine's
optimizer at ZeRO 0-3 with the config's optimizer and "auto" lr, and through a resume."""

import os

import numpy as np
import pytest
import torch
from torch import nn

from zeroloop import CheckpointSettings, Hyperparameters, LogSettings, TrainerLoop, teardown
from zeroloop.corpus import ByteCorpus, read_corpus
from zeroloop.gpt import GPT
from zeroloop.param_groups import no_decay_names, trainable_parameters, weight_decay_groups
from zeroloop.testing import full_parameters, run_ranks

LR, WEIGHT_DECAY = 3e-3, 0.1


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(n_layer=1, n_head=2, n_embd=16, block_size=16)


def corpus() -> ByteCorpus:
    return ByteCorpus(read_corpus(max_bytes=20_000), 16)


def adamw_config(stage: int, torch_adam: bool = False) -> dict:
    """AdamW from the config: DeepSpeed's FusedAdam, or torch's with ``torch_adam`` (the bundled job's)."""
    params = {"lr": "auto", "weight_decay": WEIGHT_DECAY, **({"torch_adam": True} if torch_adam else {})}
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": params},
            "zero_optimization": {"stage": stage}, "steps_per_print": 1_000_000}


class RMSNorm(nn.Module):
    """A normalization class torch does not know, recognized by its name."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, dim))  # 2-D on purpose: the name decides

    def forward(self, x):
        return x * self.scale


def test_biases_and_norm_weights_are_not_decayed():
    model = small_gpt()
    skip = no_decay_names(model)
    for name, param in model.named_parameters():
        expected = name.endswith(".bias") or ".ln" in name or "ln_f" in name
        assert (name in skip) == expected, name
    decay, no_decay = weight_decay_groups(model)
    assert "weight_decay" not in decay and no_decay["weight_decay"] == 0.0
    grouped = decay["params"] + no_decay["params"]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(model.parameters()))  # ties once


def test_norm_classes_are_recognized_by_name_and_frozen_parameters_left_out():
    model = nn.Sequential(nn.Linear(4, 4), RMSNorm(4), nn.Linear(4, 2, bias=False))
    model[0].weight.requires_grad_(False)
    assert no_decay_names(model) == {"0.bias", "1.scale"}
    decay, no_decay = weight_decay_groups(model)
    assert decay["params"] == [model[2].weight]
    assert no_decay["params"] == [model[0].bias, model[1].scale]
    no_bias = nn.Linear(3, 3, bias=False)
    assert weight_decay_groups(no_bias) == [{"params": [no_bias.weight]}]  # no empty group


def test_default_is_one_group_of_the_trainable_parameters(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    loop = TrainerLoop(model, adamw_config(0), train_data=[], output_dir=tmp_path, max_steps=1)
    assert loop.parameter_groups() == trainable_parameters(model) == [model[0].weight, model[0].bias,
                                                                      model[1].bias]
    grouped = TrainerLoop(model, adamw_config(0), train_data=[], output_dir=tmp_path, max_steps=1,
                          weight_decay_groups=True).parameter_groups()
    assert [len(g["params"]) for g in grouped] == [1, 2]


def basic_optimizer(engine):
    """The torch optimizer under DeepSpeed's ZeRO wrapper (or the engine's own at stage 0)."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def train_gpt(output_dir, steps, checkpoint=None):
    class KeepWeights(TrainerLoop):
        def on_train_end(self, summary):
            self.weights = {k: v.numpy() for k, v in full_parameters(self.engine).items()}

    loop = KeepWeights(small_gpt(), adamw_config(3, torch_adam=True), train_data=corpus(), output_dir=output_dir,
                       max_steps=steps, hparams=Hyperparameters(lr=LR), weight_decay_groups=True, checkpoint=checkpoint,
                       log=LogSettings(every=1, progress_bar=False))
    summary = loop.train()
    return {"losses": [r["loss"] for r in summary.history], "weights": loop.weights}


def groups_ranks(rank, root):
    import deepspeed

    deepspeed.init_distributed()
    groups = {}
    for stage in range(4):
        loop = TrainerLoop(small_gpt(), adamw_config(stage), train_data=corpus(), max_steps=1,
                           output_dir=os.path.join(root, f"stage{stage}"), hparams=Hyperparameters(lr=LR),
                           weight_decay_groups=True, log=LogSettings(progress_bar=False))
        engine = loop.setup()
        groups[stage] = [(g["lr"], g["weight_decay"]) for g in basic_optimizer(engine).param_groups]
        teardown(engine, destroy_process_group=False)
    # Through a resume (ZeRO-3, torch's AdamW as in the bundled job): stop at step 3, resume to
    # 6, compare with 6 straight steps.
    straight = train_gpt(os.path.join(root, "straight"), 6)
    run_dir = os.path.join(root, "resumed")
    first = train_gpt(run_dir, 3, CheckpointSettings(final_weights=False))
    second = train_gpt(run_dir, 6, CheckpointSettings(final_weights=False))
    return {"groups": groups, "straight": straight, "first": first, "second": second}


@pytest.mark.multirank
def test_weight_decay_groups_in_the_engine_optimizer_at_every_stage_and_through_resume(tmp_path):
    result = run_ranks(groups_ranks, 2, str(tmp_path))[0]
    for stage in range(4):
        assert result["groups"][stage] == [(LR, WEIGHT_DECAY), (LR, 0.0)], stage
    straight, first, second = result["straight"], result["first"], result["second"]
    assert first["losses"] + second["losses"] == straight["losses"]
    for name, value in straight["weights"].items():
        assert np.array_equal(value, second["weights"][name]), name

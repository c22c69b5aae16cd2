"""What a resume does about each difference between a checkpoint and this run (pure logic),
and a changed config on a re-run, in one process."""

import json

import pytest
from helpers import RegressionData, make_model

from zeroloop import Hyperparameters, LogSettings, TrainerLoop
from zeroloop.checkpoint import CheckpointError, Checkpointer, CheckpointSettings, RunFacts
from zeroloop.config import ConfigError
from zeroloop.resume import batch_choices, keep_global_batch, layout_of, plan_resume
from zeroloop.state import TrainState
from zeroloop.testing import single_process, tiny_config

AUTO_BATCH = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}


def manifest(world_size=2, stage=2, micro=2, accum=2, epoch_samples=40, **config_changes):
    """A manifest as a 2-rank ZeRO-2 run with micro-batch 2 x accumulation 2 saves it."""
    config = tiny_config(stage=stage, micro=micro, ga=accum, world_size=world_size)
    config.update(config_changes)
    return {"world_size": world_size, "zero_stage": stage, "micro_batch_size": micro,
            "gradient_accumulation_steps": accum, "train_batch_size": micro * accum * world_size,
            "train_state": {"step": 5, "epoch": 0, "epoch_samples": epoch_samples}, "sampler_seed": 3,
            "total_steps": 10, "samples_per_epoch": 64, "ds_config": config}


def resolved(world_size=2, stage=2, micro=2, accum=2, **changes):
    config = tiny_config(stage=stage, micro=micro, ga=accum, world_size=world_size)
    config.update(changes)
    return config


def test_auto_batch_sizes_keep_the_saved_global_micro_batch():
    config = {**tiny_config(stage=2), **AUTO_BATCH}
    for world_size, expected in ((1, (4, 2)), (2, (2, 2)), (4, (1, 2))):
        hp = keep_global_batch(config, Hyperparameters(), world_size, manifest(), where="ckpt")
        assert (hp.micro_batch_size, hp.gradient_accumulation_steps) == expected


def test_a_fixed_micro_batch_gets_the_accumulation_that_keeps_the_global_batch():
    config = {**tiny_config(stage=2, micro=2), "gradient_accumulation_steps": "auto"}
    hp = keep_global_batch(config, Hyperparameters(), 1, manifest(), where="ckpt")
    assert hp.gradient_accumulation_steps == 4 and hp.micro_batch_size is None
    hp = keep_global_batch({**tiny_config(stage=2), **AUTO_BATCH}, Hyperparameters(micro_batch_size=1), 1,
                           manifest(), where="ckpt")
    assert (hp.micro_batch_size, hp.gradient_accumulation_steps) == (1, 8)


def test_a_config_that_changes_the_global_batch_lists_the_choices():
    with pytest.raises(ConfigError) as info:
        keep_global_batch(tiny_config(stage=2, micro=2, ga=2), Hyperparameters(), 1, manifest(), where="ckpt")
    message = str(info.value)
    assert "ckpt was saved with a global batch of 8 samples per optimizer step (2 x 2 x 2 rank(s))" in message
    assert "this run's config gives 2 x 2 x 1 rank(s) = 4" in message
    assert "choices that keep it on 1 rank(s): 1 x 8, 2 x 4, 4 x 2, 8 x 1" in message
    assert "another output_dir, or CheckpointSettings(resume=None)" in message
    with pytest.raises(ConfigError, match="no micro-batch x accumulation on 3 ranks keeps it"):
        keep_global_batch({**tiny_config(stage=2), **AUTO_BATCH}, Hyperparameters(), 3, manifest(), where="ckpt")
    with pytest.raises(ConfigError, match="this run.s config sets train_batch_size=16"):
        keep_global_batch({**tiny_config(stage=2, micro=2), "gradient_accumulation_steps": "auto",
                           "train_batch_size": 16}, Hyperparameters(), 2, manifest(), where="ckpt")


def test_a_data_position_inside_a_global_micro_batch_is_refused_with_the_choices():
    # Epochs of 60 samples end inside an optimizer step of 8: the run stopped 36 samples into epoch 1.
    saved = manifest(epoch_samples=36)
    config = {**tiny_config(stage=2, micro=8), "gradient_accumulation_steps": "auto"}
    with pytest.raises(ConfigError) as info:
        keep_global_batch(config, Hyperparameters(), 1, saved, where="ckpt")
    message = str(info.value)
    assert "stopped 36 samples into epoch 0" in message and "global micro-batches of 8 (8 x 1 ranks)" in message
    assert "1 x 8, 2 x 4, 4 x 2;" in message
    assert batch_choices(8, 1, 36) == [(1, 8), (2, 4), (4, 2)]
    hp = keep_global_batch({**tiny_config(stage=2), **AUTO_BATCH}, Hyperparameters(), 1, saved, where="ckpt")
    assert (hp.micro_batch_size, hp.gradient_accumulation_steps) == (4, 2)


def test_same_layout_resumes_natively_and_reports_nothing():
    plan = plan_resume(manifest(), resolved(), 2, seed=3, total_steps=10, samples_per_epoch=64)
    assert not plan.universal and plan.changes == [] and plan.refused == [] and plan.same_ranks


def test_another_layout_loads_through_a_universal_checkpoint():
    plan = plan_resume(manifest(), resolved(world_size=1, stage=3, micro=4), 1)
    assert plan.universal and not plan.same_ranks
    assert plan.changes[0] == ("layout 2 ranks, ZeRO-2, fp32 -> 1 rank, ZeRO-3, fp32 (loaded through a universal "
                               "checkpoint)")
    assert "re-seeded from (seed, step, rank)" in plan.changes[1]
    assert "micro-batch x accumulation 2 x 2 -> 4 x 2 (global batch 8 kept)" in plan.changes[2]
    # ZeRO-0 files hold whole tensors: another world size loads them as they are.
    plan = plan_resume(manifest(stage=0), resolved(world_size=1, stage=0, micro=4), 1)
    assert not plan.universal and "DeepSpeed's files load unchanged" in plan.changes[0]
    offloaded = resolved(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})
    plan = plan_resume(manifest(), offloaded, 2)
    assert plan.universal and "optimizer offload to cpu" in plan.report()


def test_changed_settings_are_applied_or_refused_never_silent():
    new = resolved(gradient_clipping=1.0, steps_per_print=10)
    new["optimizer"] = {"type": "Adam", "params": {"lr": 0.5, "weight_decay": 0.0}}
    plan = plan_resume(manifest(), new, 2, seed=4)
    assert plan.reapply == ["gradient_clipping", "optimizer.params.lr"]
    assert "optimizer.params.lr 0.001 -> 0.5 (applied: the checkpoint's value would have been used)" in plan.changes
    assert "steps_per_print 1000000 -> 10 (applied)" in plan.changes
    assert "seed 3 -> 4 (the data order changes)" in plan.changes
    assert not plan.refused
    new["optimizer"]["type"] = "SGD"
    new["bf16"] = {"enabled": True}
    refused = plan_resume(manifest(), new, 2).refused
    assert refused[0].startswith("precision fp32 -> bf16:")
    assert refused[1].startswith("optimizer.type 'Adam' -> 'SGD': the optimizer's state does not carry over")
    assert all("CheckpointSettings(resume=None)" in line for line in refused)


def test_nvme_optimizer_offload_is_refused_with_the_reason():
    nvme = resolved(zero_optimization={"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/x"}})
    [refused] = plan_resume(manifest(stage=3, **{"zero_optimization": nvme["zero_optimization"]}), nvme, 2).refused
    assert "restores only the optimizer sub-groups it swapped to NVMe" in refused
    params_on_nvme = resolved(zero_optimization={"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"}})
    assert not plan_resume(manifest(stage=3), params_on_nvme, 2).refused


def test_another_layout_with_node_local_storage_is_refused(tmp_path):
    # Each machine holds only its own ranks' files: nothing can convert them to another layout.
    facts = RunFacts(seed=3, total_steps=10, ds_config=resolved(world_size=1, micro=4))
    checkpointer = Checkpointer(CheckpointSettings(), str(tmp_path), engine=None, state=TrainState(), facts=facts,
                                node_local=True)
    [refused] = checkpointer.plan(manifest()).refused
    assert "node-local storage" in refused and "copy every machine's tag folder into one folder" in refused
    assert not checkpointer.plan(manifest(world_size=1, micro=4)).refused  # this process is 1 rank


def test_layout_of_a_config():
    config = resolved(stage=3, bf16={"enabled": True},
                      zero_optimization={"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True}})
    layout = layout_of(config, 4)
    assert layout.describe() == "4 ranks, ZeRO-3, bf16, parameter offload to cpu"


def rerun(output_dir, lr, clip, max_steps):
    config = tiny_config(stage=2, lr=lr, clip=clip)
    loop = TrainerLoop(make_model(0), config, train_data=RegressionData(32), output_dir=output_dir,
                       max_steps=max_steps, log=LogSettings(progress_bar=False),
                       checkpoint=CheckpointSettings(final_weights=False))
    with single_process():
        loop.setup()
        lr_after_setup = loop.current_lr()
        clip_after_setup = loop.engine.optimizer.clip_grad
        summary = loop.train()
    return lr_after_setup, clip_after_setup, summary


def test_rerun_with_another_lr_applies_it_and_says_so(tmp_path):
    # DeepSpeed's load puts the saved lr and clipping back into the optimizer; the resume
    # sets this run's again, and the summary (and log) list the change.
    rerun(tmp_path, lr=1e-3, clip=0.0, max_steps=2)
    lr, clip, summary = rerun(tmp_path, lr=0.5, clip=1.0, max_steps=3)
    assert (lr, clip) == (0.5, 1.0)
    [report] = summary.warnings
    assert "optimizer.params.lr 0.001 -> 0.5 (applied" in report and "gradient_clipping 0.0 -> 1.0 (applied" in report
    written = json.loads((tmp_path / "ds_config.resolved.json").read_text())
    assert written["optimizer"]["params"]["lr"] == 0.5


def test_rerun_with_another_optimizer_is_refused_before_training(tmp_path):
    rerun(tmp_path, lr=1e-3, clip=0.0, max_steps=2)
    config = tiny_config(stage=2)
    config["optimizer"]["type"] = "AdamW"
    loop = TrainerLoop(make_model(0), config, train_data=RegressionData(32), output_dir=tmp_path, max_steps=3,
                       log=LogSettings(progress_bar=False), checkpoint=CheckpointSettings(final_weights=False))
    with single_process(), pytest.raises(CheckpointError, match="optimizer.type 'Adam' -> 'AdamW'.*new run"):
        loop.setup()
    assert loop.engine is None  # refused before deepspeed.initialize

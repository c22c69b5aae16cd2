"""The conversion to DeepSpeed's universal checkpoint, its completeness check, and
``zeroloop inspect`` (one process each; the multi-rank resumes are in test_resume_layouts.py)."""

import json
import os

import pytest
import torch
from helpers import RegressionData, make_model

from zeroloop import LogSettings, TrainerLoop
from zeroloop.checkpoint import CheckpointSettings
from zeroloop.cli import main
from zeroloop.inspection import format_inspection, inspect_checkpoint
from zeroloop.testing import fp16_on_cpu, single_process, tiny_config
from zeroloop.universal import (UNIVERSAL_MANIFEST, convert_to_universal, read_universal_manifest,
                                universal_sibling)


def train_and_save(folder, stage, precision, steps=3):
    """A few steps of a bare engine, then DeepSpeed's own save; returns what it held."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    model = make_model(0)
    with single_process():
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=tiny_config(stage=stage, precision=precision, lr=1e-2))
        data = RegressionData(16)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        for step in range(steps):
            batch = data[2 * step:2 * step + 2]
            engine.backward(engine(batch["x"].to(dtype), batch["y"].to(dtype)))
            engine.step()
        held = {"scaler": getattr(engine.optimizer, "loss_scale_config", None) and
                {key: getattr(engine.optimizer.loss_scale_config, key) for key in ("cur_scale", "cur_iter")}}
        for name, param in engine.module.named_parameters():
            if stage:
                held[name] = {"fp32": safe_get_full_fp32_param(param),
                              "exp_avg": safe_get_full_optimizer_state(param, "exp_avg"),
                              "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq")}
        if not stage:  # FP16_Optimizer: one flat fp32 group and its Adam state
            flat = engine.optimizer.fp32_groups_flat[0]
            held["flat"] = {"fp32": flat.detach().clone(), **{k: v.clone() for k, v in
                                                              engine.optimizer.optimizer.state[flat].items()
                                                              if torch.is_tensor(v) and v.dim()}}
            held["step"] = engine.optimizer.optimizer.state[flat]["step"]
        engine.save_checkpoint(folder, tag="t")
        engine.destroy()
    return held


def universal_tensor(folder, name, key):
    return torch.load(os.path.join(folder, "zero", name, f"{key}.pt"), weights_only=False)["param"]


def test_zero3_conversion_holds_the_gathered_masters_and_moments(tmp_path):
    held = train_and_save(str(tmp_path), stage=3, precision="fp32")
    folder = convert_to_universal(tmp_path / "t")
    assert folder == universal_sibling(str(tmp_path / "t"))
    manifest = read_universal_manifest(folder)
    assert (manifest["source"], manifest["source_zero_stage"], manifest["params"]) == ("t", 3, 4)
    for name in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(universal_tensor(folder, name, key), held[name][key]), (name, key)
        assert torch.load(os.path.join(folder, "zero", name, "step.pt"), weights_only=False) == 3
    optimizer_state = torch.load(os.path.join(folder, "zero", "optimizer_state.pt"), weights_only=False)
    assert optimizer_state["optimizer_state_dict"]["state"][0]["step"] == 3  # what the ZeRO-3 loader reads
    assert optimizer_state["param_groups"][0]["lr"] == 1e-2  # what the ZeRO 1-2 loader reads


def test_stage0_fp16_conversion_carries_the_flat_groups_and_the_loss_scale(tmp_path):
    with fp16_on_cpu():
        held = train_and_save(str(tmp_path), stage=0, precision="fp16")
    folder = convert_to_universal(tmp_path / "t", tmp_path / "out")
    flat = {key: torch.cat([universal_tensor(folder, name, key).reshape(-1) for name in
                            ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")])
            for key in ("fp32", "exp_avg", "exp_avg_sq")}
    for key, value in flat.items():
        assert torch.equal(value, held["flat"][key]), key
    optimizer_state = torch.load(os.path.join(folder, "zero", "optimizer_state.pt"), weights_only=False)
    # FP16_Optimizer keeps its scaler as loose fields; ZeRO loads a scaler object.
    scaler = optimizer_state["loss_scaler"]
    assert (scaler.cur_scale, scaler.cur_iter) == (held["scaler"]["cur_scale"], held["scaler"]["cur_iter"])
    assert optimizer_state["optimizer_state_dict"]["state"][0]["step"] == held["step"]


def test_an_incomplete_conversion_is_never_taken_as_complete(tmp_path):
    train_and_save(str(tmp_path), stage=2, precision="fp32", steps=1)
    folder = convert_to_universal(tmp_path / "t")
    assert read_universal_manifest(folder, quiet=True) is not None
    victim = os.path.join(folder, "zero", "net.0.weight", "exp_avg.pt")
    with open(victim, "r+b") as f:
        f.truncate(10)
    assert read_universal_manifest(folder, quiet=True) is None
    with pytest.raises(Exception, match="exp_avg.pt is 10 bytes"):
        read_universal_manifest(folder)
    os.remove(os.path.join(folder, UNIVERSAL_MANIFEST))
    assert read_universal_manifest(folder, quiet=True) is None


def test_inspect_describes_complete_and_incomplete_tags(tmp_path, capsys):
    loop = TrainerLoop(make_model(0), tiny_config(stage=1, micro=2, ga=2), train_data=RegressionData(32),
                       output_dir=tmp_path, max_steps=3, log=LogSettings(progress_bar=False),
                       checkpoint=CheckpointSettings(every=2, final_weights=False))
    with single_process():
        loop.train()
    folder = tmp_path / "checkpoints"
    os.makedirs(folder / "global_step4.tmp")  # what a crash inside a save leaves
    info = inspect_checkpoint(folder)
    assert info["latest"] == "global_step3"
    tags = {os.path.basename(tag["path"]): tag for tag in info["checkpoints"]}
    assert tags["global_step2"]["complete"] and tags["global_step3"]["samples"] == 12
    assert (tags["global_step3"]["world_size"], tags["global_step3"]["zero_stage"]) == (1, 1)
    assert tags["global_step3"]["train_batch_size"] == 4
    assert tags["global_step4.tmp"]["complete"] is False and "missing" in tags["global_step4.tmp"]["problem"]
    text = format_inspection(inspect_checkpoint(folder / "global_step3"))
    assert "[zeroloop, complete]" in text and "world size 1, ZeRO-1, fp32" in text
    assert "global batch 4 = micro-batch 2 x accumulation 2 x 1 rank(s)" in text
    assert "zeroloop_manifest.json" in text
    capsys.readouterr()  # what training printed
    assert main(["inspect", str(folder / "global_step3"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["global_step"] == 3 and printed["files"]["zeroloop_manifest.json"] > 0
    assert main(["inspect", str(tmp_path / "nothing")]) == 1

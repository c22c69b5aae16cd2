"""Resuming on another world size or ZeRO stage, and offloaded optimizers resuming exactly.

Each scenario trains 10 steps straight on the saving layout, and 5 steps, a stop and a
resume to 10 on the other one (the same global batch of 8 samples); the resume must
continue the straight run. Three ``run_ranks`` launches hold every loop: A (2 ranks: the
straight runs and first halves saved by 2 ranks, the ZeRO 2 -> 3 resume), B (1 rank: the
resumes onto 1 rank, the first halves saved by 1 rank), C (2 ranks: the resumes onto 2
ranks, in new processes, as after a real restart). Between A and B a conversion is killed
with SIGKILL, and DeepSpeed's own ``ds_to_universal`` converts a checkpoint.
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import GradBomb, RegressionData, make_model
from zeroloop import Hyperparameters, LogSettings, TrainerLoop
from zeroloop.checkpoint import CheckpointSettings, read_manifest
from zeroloop.testing import fp16_on_cpu, full_parameters, run_ranks, tiny_config
from zeroloop.universal import UNIVERSAL_MANIFEST, read_universal_manifest, universal_sibling

STEPS, STOP = 10, 5
FP32_REL = 1e-5
# bf16 keeps 8 bits of mantissa: 2**-8 relative is one rounding of a bf16 value.
BF16_REL = 2.0 ** -8
# name: (saving ranks, saving stage, resuming ranks, resuming stage, precision, offload)
SCENARIOS = {
    "2to1": (2, 2, 1, 2, "fp32", None),
    "1to2": (1, 1, 2, 1, "fp32", None),
    "stage2to3": (2, 2, 2, 3, "fp32", None),
    "stage3to1": (2, 3, 1, 1, "fp32", None),
    "stage0to2": (1, 0, 2, 2, "fp32", None),
    "bf16": (2, 2, 1, 3, "bf16", None),
    "fp16": (2, 2, 1, 2, "fp16", None),
    "offload2": (2, 2, 2, 2, "fp32", "optimizer"),
    "offload3": (2, 3, 2, 3, "fp32", "production"),
    "nvme_params": (2, 3, 2, 3, "fp32", "nvme_params"),
}
FP32_LAYOUT_CHANGES = ["2to1", "1to2", "stage2to3", "stage3to1", "stage0to2"]
MOMENTS_CHECKED = ["2to1", "stage3to1", "stage2to3", "fp16"]
OVERFLOW_STEPS = (2, 3)  # fp16: injected overflows, so the scaler's state is not its initial one


def aio_builds():
    """DeepSpeed's async_io op (NVMe offload) can build here: it needs libaio's headers."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder().is_compatible(verbose=False)


def layout_config(stage, precision, offload, root):
    """The saving and the resuming run's config: batch sizes left to "auto"."""
    config = tiny_config(stage=stage, precision=precision, lr=1e-2)
    config.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto")
    config["scheduler"] = {"type": "WarmupDecayLR",
                           "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2, "warmup_num_steps": 3,
                                      "total_num_steps": "auto"}}
    if precision == "fp16":
        config["fp16"].update(initial_scale_power=8, loss_scale_window=3, hysteresis=2)
    if offload:  # ZeRO-Offload: DeepSpeedCPUAdam; "production": ZeRO-3 with parameters offloaded too
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if offload == "production":
            config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
        if offload == "nvme_params":  # parameters swapped to a local folder through DeepSpeed's aio op
            config["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": os.path.join(root, "nvme"),
                                                            "pin_memory": True}
    return config


class LayoutLoop(TrainerLoop):
    """Stops after ``stop_at`` steps; keeps the optimizer state as saved and as loaded."""

    def __init__(self, *args, stop_at=None, overflow_steps=(), record_loaded=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_at, self.overflow_steps, self.record_loaded = stop_at, overflow_steps, record_loaded
        self.loaded = self.final = None
        self.scales = []

    def compute_loss(self, batch):
        loss = super().compute_loss(batch)
        return GradBomb.apply(loss) if self.global_step + 1 in self.overflow_steps else loss

    def on_train_start(self):
        if self.global_step and self.record_loaded:  # resumed: the state just loaded
            self.loaded = optimizer_state(self.engine)

    def on_step_end(self, step, metrics):
        if "loss_scale" in metrics:
            self.scales.append((step, metrics["loss_scale"], metrics["skipped_steps"]))
        if step == self.stop_at:
            self.checkpointer.request_stop()

    def on_train_end(self, summary):
        self.final = optimizer_state(self.engine)


def optimizer_state(engine):
    """Full fp32 masters and Adam moments by name (gathered: collective under ZeRO-3), and
    the fp16 loss scaler's state."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    state = {"weights": {name: value.numpy() for name, value in full_parameters(engine).items()}}
    if engine.zero_optimization_stage() > 0:
        for name, param in engine.module.named_parameters():
            state[f"fp32/{name}"] = safe_get_full_fp32_param(param).numpy()
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"{key}/{name}"] = safe_get_full_optimizer_state(param, key).numpy()
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if engine.fp16_enabled() and scaler is not None:
        state["scaler"] = {key: getattr(scaler, key) for key in ("cur_scale", "cur_hysteresis", "cur_iter",
                                                                 "last_overflow_iter")}
    return state


def train(root, name, part, stage, precision, offload, hparams=None, stop_at=None, resume="latest"):
    """One loop of a scenario; ``part`` is "straight", "first" or "resumed"."""
    output_dir = os.path.join(root, name, "straight" if part == "straight" else "run")
    checkpoint = None if part == "straight" else CheckpointSettings(resume=resume, final_weights=False)
    loop = LayoutLoop(make_model(0), layout_config(stage, precision, offload, root), train_data=RegressionData(64),
                      output_dir=output_dir, max_steps=STEPS, seed=3, hparams=hparams or Hyperparameters(),
                      log=LogSettings(every=1, progress_bar=False), checkpoint=checkpoint, stop_at=stop_at,
                      overflow_steps=OVERFLOW_STEPS if precision == "fp16" else (),
                      record_loaded=part == "resumed" and name in MOMENTS_CHECKED)
    summary = loop.train()
    return {"losses": [record["loss"] for record in summary.history], "steps": summary.steps,
            "warnings": summary.warnings, "loaded": loop.loaded, "final": loop.final, "scales": loop.scales,
            "micro_batch": loop.engine.train_micro_batch_size_per_gpu(),
            "accumulation": loop.engine.gradient_accumulation_steps()}


def firsts(root, names):
    """The straight run and the first half of each scenario (micro-batch 2, accumulation 2)."""
    results = {}
    for name in names:
        ranks, stage, _, _, precision, offload = SCENARIOS[name]
        hparams = Hyperparameters(micro_batch_size=2 * 2 // ranks, gradient_accumulation_steps=2)
        results[name] = {part: train(root, name, part, stage, precision, offload, hparams,
                                     stop_at=STOP if part == "first" else None) for part in ("straight", "first")}
    return results


def resumes(root, names, resume="latest"):
    """Resume each scenario on its other layout, batch sizes from "auto" (the saved global batch)."""
    return {name: train(root, name, "resumed", SCENARIOS[name][3], SCENARIOS[name][4], SCENARIOS[name][5],
                        resume=resume) for name in names}


def launch_a(rank, root, nvme):
    import deepspeed

    deepspeed.init_distributed()
    with fp16_on_cpu():
        results = firsts(root, ["2to1", "stage2to3", "stage3to1", "bf16", "fp16", "offload2", "offload3"]
                         + ["nvme_params"] * nvme)
        return results, resumes(root, ["stage2to3"])


def launch_b(rank, root, ds_universal):
    import deepspeed

    deepspeed.init_distributed()
    with fp16_on_cpu():
        resumed = resumes(root, ["2to1", "stage3to1", "bf16", "fp16"])
        # The same checkpoint again, into another run: its conversion is reused, not redone.
        tag = os.path.join(root, "2to1", "run", "checkpoints", f"global_step{STOP}")
        converted = os.path.getmtime(os.path.join(universal_sibling(tag), UNIVERSAL_MANIFEST))
        resumed["again"] = train(root, "2to1_again", "resumed", 2, "fp32", None, resume=tag)
        resumed["again"]["reused"] = converted == os.path.getmtime(os.path.join(universal_sibling(tag),
                                                                                UNIVERSAL_MANIFEST))
        resumed["ds_universal"] = train(root, "ds_universal", "resumed", 2, "fp32", None, resume=ds_universal)
        return firsts(root, ["1to2", "stage0to2"]), resumed


def launch_c(rank, root, nvme):
    import deepspeed

    deepspeed.init_distributed()
    return resumes(root, ["1to2", "stage0to2", "offload2", "offload3"] + ["nvme_params"] * nvme)


def kill_during_conversion(tag_dir):
    """Convert in a child process that SIGKILLs itself once every parameter is written,
    before the common files and the manifest: what a preemption mid-conversion leaves."""
    code = ("import os, signal, sys\n"
            "import zeroloop.universal as u\n"
            "u.write_common = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
            "u.convert_to_universal(sys.argv[1])\n")
    result = subprocess.run([sys.executable, "-c", code, tag_dir], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def deepspeed_to_universal(tag_dir, output):
    result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                             tag_dir, "--output_folder", output, "--num_extract_workers", "1",
                             "--num_merge_workers", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("layouts"))
    nvme = aio_builds()
    first_a, resumed_a = run_ranks(launch_a, 2, root, nvme, timeout=1500)[0]
    tag = os.path.join(root, "2to1", "run", "checkpoints", f"global_step{STOP}")
    kill_during_conversion(tag)
    killed = sorted(os.listdir(universal_sibling(tag) + ".tmp"))
    ds_universal = os.path.join(root, "ds_universal_input")
    deepspeed_to_universal(tag, ds_universal)
    first_b, resumed_b = run_ranks(launch_b, 1, root, ds_universal, timeout=1500)[0]
    resumed_c = run_ranks(launch_c, 2, root, nvme, timeout=1500)[0]
    return {"root": root, "first": {**first_a, **first_b}, "resumed": {**resumed_a, **resumed_b, **resumed_c},
            "killed": killed, "killed_tag": tag}


def assert_close(want, got, rel, what):
    for index, (a, b) in enumerate(zip(want, got)):
        assert abs(a - b) <= rel * max(abs(a), abs(b)), f"{what} {index}: {b!r} != {a!r} (relative {rel:g})"


def assert_continues(layouts, name, rel):
    straight, first = layouts["first"][name]["straight"], layouts["first"][name]["first"]
    resumed = layouts["resumed"][name]
    assert (first["steps"], resumed["steps"]) == (STOP, STEPS)
    assert first["losses"] == straight["losses"][:STOP]
    assert len(resumed["losses"]) == STEPS - STOP
    assert_close(straight["losses"][STOP:], resumed["losses"], rel, "loss after the resume, step")
    for param, want in straight["final"]["weights"].items():
        got = resumed["final"]["weights"][param]
        assert np.allclose(got, want, rtol=rel, atol=rel * np.abs(want).max()), param


@pytest.mark.multirank
@pytest.mark.parametrize("name", FP32_LAYOUT_CHANGES)
def test_resume_on_another_world_size_or_stage_continues_the_run(layouts, name):
    assert_continues(layouts, name, FP32_REL)
    saved_ranks, saved_stage, ranks, stage, _, _ = SCENARIOS[name]
    resumed = layouts["resumed"][name]
    # "auto" kept the global batch of 8: the saved global micro-batch of 4 where the ranks divide it.
    assert resumed["micro_batch"] * resumed["accumulation"] * ranks == 8
    assert resumed["micro_batch"] * ranks == 4 and resumed["accumulation"] == 2
    report = [w for w in resumed["warnings"] if w.startswith("resumed ")]
    assert len(report) == 1, resumed["warnings"]
    assert f"ZeRO-{saved_stage}" in report[0] and f"-> {ranks} rank" in report[0]
    assert "loaded through a universal checkpoint" in report[0]


@pytest.mark.multirank
def test_bf16_resume_on_another_world_size_and_stage_is_within_bf16_tolerance(layouts):
    assert_continues(layouts, "bf16", BF16_REL)


@pytest.mark.multirank
@pytest.mark.parametrize("name", MOMENTS_CHECKED)
def test_moments_after_a_layout_change_equal_the_saved_ones(layouts, name):
    saved = layouts["first"][name]["first"]["final"]
    loaded = layouts["resumed"][name]["loaded"]
    keys = [key for key in saved if key.startswith(("fp32/", "exp_avg/", "exp_avg_sq/"))]
    assert len(keys) == 12  # 4 parameters x (master, exp_avg, exp_avg_sq)
    for key in keys:
        assert np.array_equal(saved[key], loaded[key]), key


@pytest.mark.multirank
def test_fp16_loss_scale_and_hysteresis_carry_across_world_sizes(layouts):
    saved = layouts["first"]["fp16"]["first"]["final"]["scaler"]
    assert saved["cur_hysteresis"] == 1 and saved["cur_scale"] == 128  # after the injected overflows
    assert layouts["resumed"]["fp16"]["loaded"]["scaler"] == saved
    straight, first = layouts["first"]["fp16"]["straight"], layouts["first"]["fp16"]["first"]
    assert first["scales"] + layouts["resumed"]["fp16"]["scales"] == straight["scales"]
    assert_continues(layouts, "fp16", 2.0 ** -10)  # fp16 keeps 10 bits of mantissa


@pytest.mark.multirank
def test_sigkill_during_conversion_leaves_the_next_resume_correct(layouts):
    # The killed conversion left its parameters but no manifest; the resume redid it.
    assert layouts["killed"] and UNIVERSAL_MANIFEST not in layouts["killed"]
    sibling = universal_sibling(layouts["killed_tag"])
    assert not os.path.exists(sibling + ".tmp")
    manifest = read_universal_manifest(sibling)
    assert manifest["source"] == f"global_step{STOP}" and manifest["source_world_size"] == 2
    assert_continues(layouts, "2to1", FP32_REL)  # resumed from that conversion
    again = layouts["resumed"]["again"]
    assert again["reused"] and again["losses"] == layouts["resumed"]["2to1"]["losses"]


@pytest.mark.multirank
def test_deepspeed_universal_checkpoint_is_resume_input(layouts):
    # ds_to_universal's output of the 2-rank ZeRO-2 checkpoint, resumed on 1 rank: DeepSpeed
    # records no data position, its sample count (40 of the 64 of epoch 0) places it.
    straight = layouts["first"]["2to1"]["straight"]
    resumed = layouts["resumed"]["ds_universal"]
    assert_close(straight["losses"][STOP:], resumed["losses"], FP32_REL, "loss after the resume, step")
    assert any("ZeRO-2" in w for w in resumed["warnings"])


@pytest.mark.multirank
@pytest.mark.parametrize("name", ["offload2", "offload3", "nvme_params"])
def test_offloaded_optimizer_resumes_bit_exactly(layouts, name):
    # DeepSpeedCPUAdam on the CPU ranks; the resume runs in new processes (launch C).
    # nvme_params: ZeRO-3 parameters swapped to a local folder (DeepSpeed's aio op).
    if name not in layouts["resumed"]:
        pytest.skip("DeepSpeed's async_io op cannot build here (it needs libaio's headers: apt install libaio-dev)")
    straight, first = layouts["first"][name]["straight"], layouts["first"][name]["first"]
    resumed = layouts["resumed"][name]
    assert first["losses"] + resumed["losses"] == straight["losses"]
    for key, value in straight["final"].items():
        if key != "weights":
            assert np.array_equal(value, resumed["final"][key]), key
    for param, value in straight["final"]["weights"].items():
        assert np.array_equal(value, resumed["final"]["weights"][param]), param
    assert not [w for w in resumed["warnings"] if w.startswith("resumed ")]  # same layout: nothing changed


@pytest.mark.multirank
def test_zeroloop_checkpoints_convert_with_deepspeeds_tool_as_they_are(layouts):
    # ds_to_universal ran without --inject_missing_state: zeroloop's saves carry the marker.
    manifest = read_manifest(layouts["killed_tag"])
    assert manifest["train_batch_size"] == 8 and manifest["samples_per_epoch"] == 64
    assert os.path.isfile(os.path.join(layouts["root"], "ds_universal_input", "zero", "optimizer_state.pt"))

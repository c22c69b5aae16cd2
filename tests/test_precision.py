"""fp16 loss scaling made visible, the health policy, and non-finite losses (2 ranks, CPU).

DeepSpeed refuses fp16 on a CPU; ``fp16_on_cpu()`` lets its fp16 paths run for the test.
"""

import math
import os
import tempfile

import deepspeed
import pytest
import torch

from helpers import GradBomb, RegressionData, make_model
from zeroloop import ConfigError, HealthPolicy, LogSettings, NumericalHealthError, TrainerLoop
from zeroloop.testing import fp16_on_cpu, full_parameters, run_ranks, single_process, tiny_config

STEPS = 7
OVERFLOW_STEPS = (2, 3)


class Injecting(TrainerLoop):
    """Overflows the gradients at chosen optimizer steps; records weights and metrics."""

    overflow_steps = ()
    nan_at = None  # (optimizer step, rank) whose loss becomes NaN
    nan_once = True  # or at every micro-batch from then on

    def on_train_start(self):
        self.weights, self.metrics = [], []

    def compute_loss(self, batch):
        loss = super().compute_loss(batch)
        step = self.global_step + 1
        if step in self.overflow_steps:
            loss = GradBomb.apply(loss)
        if self.nan_at == (step, self.rank):
            loss = loss * float("nan")
            self.nan_at = None if self.nan_once else self.nan_at
        return loss

    def on_step_end(self, step, metrics):
        self.metrics.append(metrics)
        self.weights.append(full_parameters(self.engine))


def fp16_config(stage, hysteresis=2, min_loss_scale=1, window=3):
    config = tiny_config(stage=stage, precision="fp16")
    config["fp16"].update(initial_scale_power=8, loss_scale_window=window, hysteresis=hysteresis,
                          min_loss_scale=min_loss_scale)
    config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 1e-3,
                                                          "warmup_num_steps": 10}}
    return config


def run_loop(config, steps=STEPS, overflow_steps=(), nan_at=None, health=None, nan_once=True):
    loop = Injecting(make_model(), config, train_data=RegressionData(n=128), output_dir=tempfile.mkdtemp(),
                     max_steps=steps, health=health, log=LogSettings(every=1, progress_bar=False))
    loop.overflow_steps, loop.nan_at, loop.nan_once = overflow_steps, nan_at, nan_once
    summary = loop.train()
    return loop, summary


def injected_overflows(rank, stage):
    with fp16_on_cpu():
        loop, summary = run_loop(fp16_config(stage), overflow_steps=OVERFLOW_STEPS)
    unchanged = [all(torch.equal(loop.weights[i][k], loop.weights[i - 1][k]) for k in loop.weights[i])
                 for i in range(1, STEPS)]
    return loop.metrics, summary.history, unchanged, summary.skipped_steps


# Scale in force after each step: initial 2**8; halved per overflow (ZeRO's scaler first spends
# its hysteresis of 2); doubled after loss_scale_window=3 clean steps.
EXPECTED_SCALES = {0: [256, 128, 64, 64, 64, 64, 128], "zero": [256, 256, 128, 128, 128, 128, 256]}


@pytest.mark.multirank
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_injected_overflow_skips_the_step_on_every_rank(stage):
    for metrics, history, unchanged, skipped in run_ranks(injected_overflows, 2, stage):
        assert [m["overflow"] for m in metrics] == [s in OVERFLOW_STEPS for s in range(1, STEPS + 1)]
        assert [m["skipped_steps"] for m in metrics] == [0, 1, 2, 2, 2, 2, 2] and skipped == 2
        assert [m["loss_scale"] for m in metrics] == EXPECTED_SCALES[0 if stage == 0 else "zero"]
        # Parameters untouched by the overflowing steps (2 and 3), moved by the others.
        assert unchanged == [True, True, False, False, False, False]  # step k against step k-1
        # The scheduler does not advance on a skipped step: WarmupLR's log warm-up gives
        # 1e-4 + 9e-4 * log10(applied steps), and steps 2 and 3 were not applied.
        applied = [1, 1, 1, 2, 3, 4, 5]
        assert [m["lr"] for m in metrics] == pytest.approx([1e-4 + 9e-4 * math.log10(n) for n in applied])
        # Logged: the unscaled fp32 loss, finite even on the overflowing steps.
        assert all(math.isfinite(h["loss"]) and h["loss"] < 100 for h in history)
        assert all({"loss_scale", "overflow", "skipped_steps"} <= set(h) for h in history)


def health_policies(rank):
    """Persistent overflow and a scale stuck at its minimum stop the run; "warn" goes on."""
    deepspeed.init_distributed()
    outcome = {}
    with fp16_on_cpu():
        try:
            run_loop(fp16_config(2, hysteresis=1), steps=10, overflow_steps=range(2, 11),
                     health=HealthPolicy(max_consecutive_overflows=3))
        except NumericalHealthError as e:
            outcome["persistent"] = str(e)
        try:
            run_loop(fp16_config(2, hysteresis=1, min_loss_scale=64), steps=6, overflow_steps=(2, 3, 4))
        except NumericalHealthError as e:
            outcome["minimum"] = str(e)
        loop, summary = run_loop(fp16_config(2, hysteresis=1, min_loss_scale=64), steps=6,
                                 overflow_steps=(2, 3, 4, 5), health=HealthPolicy(loss_scale="warn"))
        outcome["warn"] = (summary.steps, summary.skipped_steps, [m["loss_scale"] for m in loop.metrics])
    return outcome


@pytest.mark.multirank
def test_health_policy_stops_before_deepspeed_and_warn_keeps_going():
    for outcome in run_ranks(health_policies, 2):
        persistent = outcome["persistent"]
        assert "step 4: 3 optimizer steps in a row overflowed" in persistent
        assert "switch to bf16" in persistent and "lower the learning rate" in persistent
        assert "1:256, 2:128*, 3:64*, 4:32*" in persistent  # scale in force after each step
        # min 64: step 2 halves 256 -> 128, step 3 -> 64; zeroloop stops there, before the
        # overflow at step 4 that DeepSpeed would end the run on.
        assert "at step 3: the fp16 loss scale is at its minimum (64)" in outcome["minimum"]
        steps, skipped, scales = outcome["warn"]
        assert (steps, skipped) == (6, 4)
        assert scales == [256, 128, 64, 64, 64, 64]


def non_finite_raise(rank, precision, stage):
    """A NaN on rank 1 only, then on both ranks: every rank stops, with the same error."""
    deepspeed.init_distributed()
    messages = []
    for nan_ranks in ((1,), (0, 1)):
        try:
            run_loop(tiny_config(stage=stage, precision=precision), steps=4,
                     nan_at=(2, rank) if rank in nan_ranks else None)
            messages.append(None)
        except NumericalHealthError as e:
            messages.append(str(e))
    return messages


def non_finite_skip(rank, precision, stage):
    deepspeed.init_distributed()
    config = tiny_config(stage=stage, precision=precision)
    loop, summary = run_loop(config, steps=4, nan_at=(2, 1), health=HealthPolicy(non_finite="skip"))
    try:
        run_loop(config, steps=4, nan_at=(2, 1), nan_once=False,
                 health=HealthPolicy(non_finite="skip", max_consecutive_overflows=5))
        persistent = None
    except NumericalHealthError as e:
        persistent = str(e)
    return summary.steps, summary.skipped_micro_batches, loop.weights[-1], summary.final_loss, persistent


@pytest.mark.multirank
@pytest.mark.parametrize("precision, stage", [("fp32", 0), ("bf16", 2)])
def test_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_error(precision, stage):
    (one_rank_0, both_0), (one_rank_1, both_1) = run_ranks(non_finite_raise, 2, precision, stage, timeout=180)
    assert one_rank_0 == one_rank_1  # rank 0 saw no NaN, and stops with rank 1's error, not a transport error
    assert "non-finite loss (nan) at optimizer step 2, epoch 0, micro-batch 1 of the epoch, on rank 1." in one_rank_0
    assert both_0 == both_1 and "micro-batch 1 of the epoch, on ranks 0, 1." in both_0


@pytest.mark.multirank
@pytest.mark.parametrize("precision, stage", [("fp32", 0), ("bf16", 2)])
def test_non_finite_loss_is_skipped_on_every_rank_in_step(precision, stage):
    results = run_ranks(non_finite_skip, 2, precision, stage)
    for steps, skipped, _, final_loss, persistent in results:
        assert (steps, skipped) == (4, 1)  # the NaN micro-batch dropped on both ranks, 4 steps still made
        assert math.isfinite(final_loss)
        assert "5 micro-batches in a row had non-finite losses" in persistent
    weights = [r[2] for r in results]
    for name in weights[0]:  # the ranks stayed in step
        assert torch.equal(weights[0][name], weights[1][name])


def test_fp16_on_a_device_that_refuses_it_is_a_config_error(tmp_path, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    # A device without fp16, whichever this machine has (a CPU refuses it; a GPU would not).
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    loop = TrainerLoop(make_model(), tiny_config(precision="fp16"), train_data=RegressionData(),
                       output_dir=tmp_path, max_steps=1)
    with single_process(), pytest.raises(ConfigError, match="fp16.enabled: this device .* does not support fp16"):
        loop.setup()
    assert loop.engine is None  # refused before deepspeed.initialize


def test_bad_health_policy_is_reported_with_the_other_arguments(tmp_path):
    loop = TrainerLoop(make_model(), tiny_config(), train_data=RegressionData(), output_dir=tmp_path,
                       max_steps=0, health=HealthPolicy(loss_scale="ignore", non_finite="zero",
                                                        max_consecutive_overflows=0))
    with pytest.raises(ConfigError) as info:
        loop.setup()
    assert len(info.value.problems) == 4
    for key in ("max_steps", "health.loss_scale", "health.non_finite", "health.max_consecutive_overflows"):
        assert key in str(info.value)


def fp16_resume(rank, root):
    """Seven steps straight, against four, a stop, and a resume to seven (ZeRO-2, fp16)."""
    from zeroloop import CheckpointSettings

    deepspeed.init_distributed()
    config = fp16_config(2)
    scales = {}
    with fp16_on_cpu():
        for name, steps, resume in (("straight", 7, None), ("first", 4, None), ("resumed", 7, "latest")):
            settings = CheckpointSettings(resume=resume, final_weights=False, handle_signals=False,
                                          folder=os.path.join(root, "straight" if name == "straight" else "split"))
            loop = Injecting(make_model(), config, train_data=RegressionData(n=128), output_dir=tempfile.mkdtemp(),
                             max_steps=steps, checkpoint=settings, log=LogSettings(every=1, progress_bar=False))
            loop.overflow_steps = OVERFLOW_STEPS
            loop.train()
            scales[name] = [(m["step"], m["loss_scale"], m["skipped_steps"]) for m in loop.metrics]
    return scales


@pytest.mark.multirank
def test_fp16_resume_continues_with_the_saved_scale(tmp_path):
    for scales in run_ranks(fp16_resume, 2, str(tmp_path)):
        # The straight run's scale history, split at the checkpoint after step 4: the
        # resumed run goes on with the scale, hysteresis and clean-step count it saved
        # (a fresh scaler would start again at 256 and double later).
        assert scales["straight"] == [(1, 256, 0), (2, 256, 1), (3, 128, 2), (4, 128, 2), (5, 128, 2),
                                      (6, 128, 2), (7, 256, 2)]
        assert scales["first"] + scales["resumed"] == scales["straight"]

"""bf16 left to zeroloop: the mode chosen (DeepSpeed's torch_autocast or its bf16 mode), what
is passed to DeepSpeed, and training, parity and resume in autocast on 2 ranks."""

import json
import os
import tempfile

import numpy as np
import pytest
import torch

from helpers import RegressionData, make_model
from zeroloop import (CheckpointError, CheckpointSettings, ConfigError, Hyperparameters, LogSettings, TrainerLoop,
                      consolidate)
from zeroloop.autocast import (AUTOCAST_SECTION, TORCH_AUTOCAST, choose_bf16_mode, left_to_zeroloop,
                               precision_mode, with_mode)
from zeroloop.config import resolve_config
from zeroloop.safetensors_io import load_state_dict
from zeroloop.memory import plan
from zeroloop.testing import assert_matches_engine_loop, full_parameters, run_ranks, single_process, tiny_config

BF16 = Hyperparameters(precision="bf16")
QUIET = LogSettings(every=1, progress_bar=False)
STEPS = 4


def resolved(raw, hparams=BF16):
    return resolve_config(raw, world_size=1, hparams=hparams)


# --- the rule, as pure logic ------------------------------------------------------------------


@pytest.mark.parametrize("raw, hparams, left", [
    (tiny_config(), BF16, True),  # the loop's precision added the bf16 section
    ({**tiny_config(), "bf16": {"enabled": "auto"}}, BF16, True),
    (tiny_config(precision="bf16"), BF16, False),  # the user enabled it: never changed
    (tiny_config(precision="bf16"), Hyperparameters(), False),
    ({**tiny_config(), "bf16": {"enabled": "auto", "immediate_grad_update": True}}, BF16, False),
    ({**tiny_config(), "torch_autocast": {"enabled": False}}, BF16, False),  # the user's autocast section
    (tiny_config(), Hyperparameters(precision="fp32"), False),
    ({**tiny_config(), "bf16": {"enabled": "auto"}}, Hyperparameters(precision="fp16"), False),
])
def test_what_is_left_to_zeroloop(raw, hparams, left):
    assert left_to_zeroloop(raw, resolved(raw, hparams)) is left


@pytest.mark.parametrize("change, device, fits, mode, reason", [
    ({}, "cuda", None, TORCH_AUTOCAST, "ZeRO-0 on cuda"),
    ({"zero_optimization": {"stage": 2}}, "cuda", True, TORCH_AUTOCAST, "ZeRO-2 on cuda"),
    ({"zero_optimization": {"stage": 1}}, "cpu", None, TORCH_AUTOCAST, "ZeRO-1 on cpu"),
    ({"zero_optimization": {"stage": 3}}, "cuda", None, "bf16", "ZeRO-3 keeps"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "cuda", None, "bf16",
     "offload_optimizer keeps"),
    ({"communication_data_type": "fp32"}, "cuda", None, "bf16", "communication_data_type is set"),
    ({"data_types": {"grad_accum_dtype": "fp32"}}, "cuda", None, "bf16", "data_types.grad_accum_dtype"),
    ({}, "cuda", False, "bf16", "would not fit the device memory"),
    ({}, "xpu", None, "bf16", "not measured on xpu"),
])
def test_the_bf16_mode_rule(change, device, fits, mode, reason):
    config = {**resolved(tiny_config()), **change}
    choice = choose_bf16_mode(config, device, autocast_fits=fits)
    assert choice.mode == mode and reason in choice.reason


def test_autocast_replaces_the_bf16_section_and_names_its_dtype():
    config = resolved(tiny_config(stage=2))
    out = with_mode(config, TORCH_AUTOCAST)
    assert "bf16" not in out and out[TORCH_AUTOCAST] == {"enabled": True, "dtype": "bfloat16"}
    assert out == {**{k: v for k, v in config.items() if k != "bf16"}, TORCH_AUTOCAST: AUTOCAST_SECTION}
    assert with_mode(config, "bf16") == config and "bf16" in config  # the input is not changed
    assert precision_mode(out) == TORCH_AUTOCAST and precision_mode(config) == "bf16"
    with pytest.raises(ValueError, match="mode: must be one of"):
        with_mode(config, "fp8")


def test_a_config_with_its_own_autocast_gets_no_bf16_section():
    raw = {**tiny_config(), "bf16": {"enabled": "auto"}, TORCH_AUTOCAST: {"enabled": True, "dtype": "bfloat16"}}
    assert resolved(raw)["bf16"] == {"enabled": False}
    assert "bf16" not in resolved({**tiny_config(), TORCH_AUTOCAST: {"enabled": True}})
    both = {**tiny_config(precision="bf16"), TORCH_AUTOCAST: {"enabled": True}}
    with pytest.raises(ConfigError, match="bf16.enabled and torch_autocast.enabled are both true"):
        resolved(both, Hyperparameters())


def test_the_planner_prices_fp32_weights_and_gradients_under_autocast():
    psi, n = 10**9, 4
    bf16, autocast = plan(params=psi, world_size=n, precision="bf16"), plan(params=psi, world_size=n,
                                                                            precision="autocast")
    # ZeRO-0: 16 bytes per parameter (fp32 weights, gradients, Adam's 8) against bf16's 2 + 2 + 12 + 4.
    assert autocast["ddp"].model_states + autocast["ddp"].fp32_grads == 16 * psi
    assert bf16["ddp"].model_states + bf16["ddp"].fp32_grads == 20 * psi
    # ZeRO-2: replicated fp32 weights (4, not 2); fp32 gradients and the fp32 partition copy sharded.
    assert (autocast["zero2"].params, autocast["zero2"].grads) == (4 * psi, 4 * psi // n)
    assert autocast["zero2"].optimizer == (8 + 4) * psi // n and autocast["zero2"].fp32_grads == 0
    # A bucket per gradient dtype: bf16 for Linear weights, fp32 for the rest.
    assert autocast["zero2"].buffers == autocast.inputs.buckets.reduce_bucket_size * 6
    assert plan(params=psi, ds_config=with_mode(resolved(tiny_config()), TORCH_AUTOCAST)).inputs.precision == \
        "autocast"


def test_autocast_activations_are_priced_between_bf16_and_fp32():
    sizes = dict(params=10**8, micro_batch=2, seq_len=1024, hidden_size=768, layers=12)
    without = {p: plan(precision=p, **sizes).activations[0] for p in ("bf16", "autocast", "fp32")}
    assert without["autocast"] == pytest.approx(1.5 * without["bf16"], rel=1e-6)
    assert without["fp32"] == pytest.approx(2 * without["bf16"], rel=1e-6)


# --- what the loop passes to DeepSpeed (one process) -----------------------------------------


class DtypeRecorder(TrainerLoop):
    def compute_loss(self, batch):
        self.input_dtype = batch["x"].dtype
        return super().compute_loss(batch)

    def on_train_end(self, summary):
        self.weight_dtype = next(self.engine.module.parameters()).dtype
        self.autocast_on = self.engine.torch_autocast_enabled()


def train_bf16(output_dir, config, **kwargs):
    loop = DtypeRecorder(make_model(), config, train_data=RegressionData(), output_dir=output_dir, max_steps=2,
                         hparams=BF16, log=QUIET, **kwargs)
    loop.train()
    return loop


def test_the_loop_runs_bf16_under_autocast_with_float_inputs(tmp_path, monkeypatch, caplog):
    with single_process(), caplog.at_level("INFO", logger="zeroloop"):
        loop = train_bf16(tmp_path / "auto", tiny_config())
    assert loop.bf16_choice.mode == TORCH_AUTOCAST and "bf16: torch_autocast (ZeRO-0" in caplog.text
    written = json.loads((tmp_path / "auto" / "ds_config.resolved.json").read_text())
    assert written[TORCH_AUTOCAST] == AUTOCAST_SECTION and "bf16" not in written
    assert (loop.autocast_on, loop.weight_dtype, loop.input_dtype) == (True, torch.float32, torch.float32)

    # Where fp32 weights would not fit, DeepSpeed's bf16 mode, with bf16 inputs.
    import zeroloop.autocast

    monkeypatch.setattr(zeroloop.autocast, "fits_device_memory", lambda *args: False)
    with single_process():
        loop = train_bf16(tmp_path / "small", tiny_config())
    assert loop.bf16_choice.mode == "bf16" and loop.ds_config["bf16"] == {"enabled": True}
    assert (loop.autocast_on, loop.weight_dtype, loop.input_dtype) == (False, torch.bfloat16, torch.bfloat16)


def test_an_explicit_bf16_section_is_never_changed(tmp_path):
    with single_process():
        loop = train_bf16(tmp_path, tiny_config(precision="bf16"))
    assert loop.bf16_choice is None and TORCH_AUTOCAST not in loop.ds_config
    assert (loop.autocast_on, loop.weight_dtype) == (False, torch.bfloat16)


def test_resuming_in_another_mode_is_refused_with_the_section_that_pins_it(tmp_path):
    settings = CheckpointSettings(every=1, resume="latest", final_weights=False)
    with single_process():
        train_bf16(tmp_path, tiny_config(precision="bf16"), checkpoint=settings)
    with single_process(), pytest.raises(CheckpointError, match=r"saved in bf16 mode, this run's config resolves "
                                                                r"to torch_autocast mode.*\"bf16\": \{\"enabled\": true\}"):
        train_bf16(tmp_path, tiny_config(), checkpoint=settings)


# --- 2 ranks: training, parity with the hand loop, exact resume -------------------------------


def make_loop(model, stage, **kwargs):
    return TrainerLoop(model, tiny_config(stage=stage, ga=2), train_data=RegressionData(),
                       output_dir=tempfile.mkdtemp(), max_steps=STEPS, hparams=BF16, log=QUIET, **kwargs)


def parity_and_resume(rank, root):
    """Per stage: the mode zeroloop picks, TrainerLoop against the hand loop given that mode's
    config explicitly (bit for bit), and a stopped-and-resumed run against a straight one."""
    import deepspeed

    deepspeed.init_distributed()  # one process group for every loop
    results = {}
    for stage in range(4):
        loops = []

        def recording(model, stage=stage):
            loops.append(make_loop(model, stage))
            return loops[-1]

        mode = TORCH_AUTOCAST if stage < 3 else "bf16"
        reference = with_mode(resolve_config(tiny_config(stage=stage, ga=2), world_size=2, hparams=BF16), mode)
        assert_matches_engine_loop(recording, make_model, reference, RegressionData(), STEPS, rel=0.0)
        results[stage] = {"mode": precision_mode(loops[0].ds_config), "resume": resume_run(stage, root)}
    return results


class Stopping(TrainerLoop):
    stop_at = None

    def on_step_end(self, step, metrics):
        if step == self.stop_at:
            self.checkpointer.request_stop()

    def on_train_end(self, summary):
        self.final_weights = {name: value.numpy() for name, value in full_parameters(self.engine).items()}


def resume_run(stage, root):
    def run(output_dir, stop_at=None):
        loop = Stopping(make_model(), tiny_config(stage=stage, ga=2), train_data=RegressionData(),
                        output_dir=output_dir, max_steps=STEPS, hparams=BF16, log=QUIET,
                        checkpoint=CheckpointSettings(every=1, resume="latest", final_weights=False))
        loop.stop_at = stop_at
        summary = loop.train()
        return [h["loss"] for h in summary.history], loop.final_weights

    straight = run(os.path.join(root, f"straight{stage}"))
    first = run(os.path.join(root, f"run{stage}"), stop_at=2)
    second = run(os.path.join(root, f"run{stage}"))
    return straight, first, second


@pytest.mark.multirank
def test_two_ranks_train_at_every_stage_like_the_hand_loop_and_resume_exactly(tmp_path):
    results = run_ranks(parity_and_resume, 2, str(tmp_path))
    for result in results:
        assert [result[stage]["mode"] for stage in range(4)] == [TORCH_AUTOCAST] * 3 + ["bf16"]
        for stage in range(4):
            (losses, weights), (first, _), (rest, resumed) = result[stage]["resume"]
            assert first + rest == losses, stage
            for name, value in weights.items():
                assert np.array_equal(value, resumed[name]), (stage, name)
    # An autocast checkpoint consolidates to the weights the engine trained (fp32, the
    # module's own: there is no separate master copy to prefer).
    for stage in range(3):
        out = tmp_path / f"consolidated{stage}"
        consolidate(str(tmp_path / f"run{stage}" / "checkpoints"), str(out), progress=False)
        consolidated, trained = load_state_dict(out), results[0][stage]["resume"][2][1]
        assert consolidated.keys() == trained.keys(), stage
        for name, value in trained.items():
            assert consolidated[name].dtype == torch.float32 and np.array_equal(consolidated[name].numpy(), value), \
                (stage, name)

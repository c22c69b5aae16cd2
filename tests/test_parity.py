"""TrainerLoop against a hand-written engine.backward/step loop, on 2 ranks.

Both loops run in the same rank processes, on the same data, seed and config; the loop
must add nothing to what DeepSpeed computes.
"""

import functools
import io
import sys
import tempfile

import deepspeed
import pytest
import torch

from helpers import RegressionData, make_model
from zeroloop import LogSettings, TrainerLoop
from zeroloop.testing import RankFailure, assert_matches_engine_loop, full_parameters, run_ranks, tiny_config

pytestmark = pytest.mark.multirank
STEPS = 6


class Recording(TrainerLoop):
    """Keeps the final weights."""

    def on_train_end(self, summary):
        self.final_weights = full_parameters(self.engine)


def zeroloop_run(config, steps, seed=0):
    loop = Recording(make_model(), config, train_data=RegressionData(), output_dir=tempfile.mkdtemp(),
                     max_steps=steps, seed=seed, log=LogSettings(every=1, progress_bar=False))
    summary = loop.train()
    return loop.final_weights, summary


def make_loop(model, config):
    return TrainerLoop(model, config, train_data=RegressionData(), output_dir=tempfile.mkdtemp(), max_steps=STEPS,
                       log=LogSettings(every=1, progress_bar=False))


def compare(rank, config, rel):
    """zeroloop's own kit: TrainerLoop against the hand-written engine loop, same ranks."""
    reference = assert_matches_engine_loop(functools.partial(make_loop, config=config), make_model, config,
                                           RegressionData(), STEPS, rel=rel)
    return len(reference.micro_losses)


# Bit for bit (rel 0) in every precision: both loops run the same DeepSpeed engine, with the
# same config, on the same batches in the same order, so they perform the same operations on the
# same numbers; a tolerance would hide a loop that adds any (a cast, a scale, another reduction).


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp32_matches_hand_loop_exactly(stage):
    assert run_ranks(compare, 2, tiny_config(stage=stage, ga=2), 0.0) == [STEPS * 2] * 2


def test_bf16_zero2_matches_hand_loop_exactly():
    assert run_ranks(compare, 2, tiny_config(stage=2, precision="bf16"), 0.0) == [STEPS] * 2


def test_a_different_loop_is_caught():
    """The comparison can fail: a loop on another seed trains on other batches."""
    with pytest.raises(RankFailure, match="micro-batch 0: loop loss"):
        run_ranks(compare_other_seed, 2, tiny_config(stage=0), 0.0)


def compare_other_seed(rank, config, rel):
    def other_seed(model):
        return TrainerLoop(model, config, train_data=RegressionData(), output_dir=tempfile.mkdtemp(),
                           max_steps=STEPS, seed=1, log=LogSettings(every=1, progress_bar=False))
    assert_matches_engine_loop(other_seed, make_model, config, RegressionData(), STEPS, rel=rel)


def accumulation_pair(rank):
    """Micro 2 x accumulation 4 against micro 8 x accumulation 1; quiet bar on rank 1 only."""
    deepspeed.init_distributed()
    stderr, sys.stderr = sys.stderr, io.StringIO()
    try:
        w_accum, s_accum = zeroloop_run(tiny_config(stage=2, micro=2, ga=4), steps=3)
        loop = Recording(make_model(), tiny_config(stage=2, micro=8, ga=1), train_data=RegressionData(),
                         output_dir=tempfile.mkdtemp(), max_steps=3, log=LogSettings(every=1))
        s_big = loop.train()
        bar_text = sys.stderr.getvalue()
    finally:
        sys.stderr = stderr
    return s_accum, w_accum, s_big, loop.final_weights, bar_text


def test_gradient_accumulation_matches_a_bigger_micro_batch_and_bar_is_rank0_only():
    results = run_ranks(accumulation_pair, 2)
    for rank, (s_accum, w_accum, s_big, w_big, bar_text) in enumerate(results):
        h_accum, h_big = s_accum.history, s_big.history
        assert [h["loss"] for h in h_accum] == pytest.approx([h["loss"] for h in h_big], rel=1e-5)
        for name in w_accum:
            torch.testing.assert_close(w_accum[name], w_big[name], rtol=1e-5, atol=1e-6)
        assert [h["step"] for h in h_accum] == [1, 2, 3]
        # 2 ranks x 8 samples per optimizer step, in both settings: 4 or 1 micro-steps a step.
        assert (s_accum.micro_steps, s_big.micro_steps) == (12, 3)
        for summary in (s_accum, s_big):
            assert summary.samples == 16 * 3
            assert summary.wall_time_s > 0
            assert summary.samples_per_sec == pytest.approx(summary.samples / summary.wall_time_s, rel=1e-12)
        if rank == 0:
            assert "train:" in bar_text and "3/3" in bar_text and "loss=" in bar_text
        else:  # warnings may appear, the bar may not
            assert "train:" not in bar_text and "3/3" not in bar_text

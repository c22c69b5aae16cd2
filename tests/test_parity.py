"""TrainerLoop against a hand-written engine.backward/step loop, on 2 ranks.

Both loops run in the same rank processes, on the same data, seed and config; the loop
must add nothing to what DeepSpeed computes.
"""

import io
import sys
import tempfile

import deepspeed
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from helpers import RegressionData, make_model
from zeroloop import LogSettings, TrainerLoop, resolve_config, seed_everything
from zeroloop.testing import full_parameters, run_ranks, tiny_config

pytestmark = pytest.mark.multirank
STEPS = 6


class Recording(TrainerLoop):
    """Keeps every micro-batch loss of this rank, and the final weights."""

    def on_train_start(self):
        self.micro_losses = []

    def compute_loss(self, batch):
        loss = super().compute_loss(batch)
        self.micro_losses.append(loss.item())
        return loss

    def on_train_end(self, summary):
        self.final_weights = full_parameters(self.engine)


def hand_written_loop(config, steps, seed=0):
    """The loop users write by hand, on the same sampler/loader TrainerLoop builds."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    resolved = resolve_config(config, world_size=world)
    model = make_model()
    seed_everything(seed)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=resolved)
    data = RegressionData()
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(data, batch_size=resolved["train_micro_batch_size_per_gpu"], sampler=sampler,
                        drop_last=True)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else None
    losses, step, epoch = [], 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            x, y = (t.to(dtype) if dtype else t for t in (batch["x"], batch["y"]))
            loss = engine(x, y)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            losses.append(loss.item())
            step += boundary
            if step == steps:
                break
        epoch += 1
    weights = full_parameters(engine)
    engine.destroy()
    return losses, weights


def zeroloop_run(config, steps, seed=0):
    loop = Recording(make_model(), config, train_data=RegressionData(), output_dir=tempfile.mkdtemp(),
                     max_steps=steps, seed=seed, log=LogSettings(every=1, progress_bar=False))
    summary = loop.train()
    return loop.micro_losses, loop.final_weights, summary


def both_loops(rank, config):
    deepspeed.init_distributed()  # shared by both loops, torn down by run_ranks
    hand_losses, hand_weights = hand_written_loop(config, STEPS)
    loop_losses, loop_weights, _ = zeroloop_run(config, STEPS)
    return hand_losses, loop_losses, hand_weights, loop_weights


def assert_close(a, b, rel):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=rel, abs=rel), (a, b)


def test_stage0_fp32_matches_hand_loop_exactly():
    for hand, loop, hand_w, loop_w in run_ranks(both_loops, 2, tiny_config(stage=0, ga=2)):
        assert len(hand) == STEPS * 2
        assert hand == loop
        for name in hand_w:
            assert torch.equal(hand_w[name], loop_w[name]), name


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_fp32_matches_hand_loop(stage):
    for hand, loop, hand_w, loop_w in run_ranks(both_loops, 2, tiny_config(stage=stage, ga=2)):
        assert_close(hand, loop, rel=1e-6)
        for name in hand_w:
            torch.testing.assert_close(loop_w[name], hand_w[name], rtol=1e-6, atol=1e-7)


def test_bf16_zero2_matches_hand_loop():
    for hand, loop, hand_w, loop_w in run_ranks(both_loops, 2, tiny_config(stage=2, precision="bf16")):
        assert_close(hand, loop, rel=1e-2)  # bf16 keeps 8 bits of mantissa
        for name in hand_w:
            torch.testing.assert_close(loop_w[name], hand_w[name], rtol=1e-2, atol=1e-2)


def accumulation_pair(rank):
    """Micro 2 x accumulation 4 against micro 8 x accumulation 1; quiet bar on rank 1 only."""
    deepspeed.init_distributed()
    stderr, sys.stderr = sys.stderr, io.StringIO()
    try:
        _, w_accum, s_accum = zeroloop_run(tiny_config(stage=2, micro=2, ga=4), steps=3)
        loop = Recording(make_model(), tiny_config(stage=2, micro=8, ga=1), train_data=RegressionData(),
                         output_dir=tempfile.mkdtemp(), max_steps=3, log=LogSettings(every=1))
        s_big = loop.train()
        bar_text = sys.stderr.getvalue()
    finally:
        sys.stderr = stderr
    return s_accum.history, w_accum, s_big.history, loop.final_weights, bar_text


def test_gradient_accumulation_matches_a_bigger_micro_batch_and_bar_is_rank0_only():
    results = run_ranks(accumulation_pair, 2)
    for rank, (h_accum, w_accum, h_big, w_big, bar_text) in enumerate(results):
        assert [h["loss"] for h in h_accum] == pytest.approx([h["loss"] for h in h_big], rel=1e-5)
        for name in w_accum:
            torch.testing.assert_close(w_accum[name], w_big[name], rtol=1e-5, atol=1e-6)
        assert [h["step"] for h in h_accum] == [1, 2, 3]
        # 2 ranks x 8 samples per optimizer step, in both settings.
        assert h_accum[-1]["samples_per_sec"] > 0
        if rank == 0:
            assert "train:" in bar_text and "3/3" in bar_text and "loss=" in bar_text
        else:  # warnings may appear, the bar may not
            assert "train:" not in bar_text and "3/3" not in bar_text

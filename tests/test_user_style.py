"""A user's tests of their own TrainerLoop subclass, written with zeroloop.testing only.

This file imports nothing from zeroloop's own test helpers: it is the example the
"Testing your loop" page shows.
"""

import tempfile

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from zeroloop import LogSettings, TrainerLoop
from zeroloop.testing import (RankFailure, assert_matches_engine_loop, fp16_on_cpu, run_ranks, single_process,
                              tiny_config)

STEPS = 4


class Blobs(Dataset):
    """Two Gaussian blobs, labelled 0 and 1."""

    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % 2
        self.points = torch.randn(n, 4, generator=g) + 2.0 * self.labels[:, None]

    def __len__(self):
        return len(self.points)

    def __getitem__(self, i):
        return {"points": self.points[i], "labels": self.labels[i]}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


class SmoothedClassifier(TrainerLoop):
    """The loop under test: cross-entropy with label smoothing."""

    def compute_loss(self, batch):
        logits = self.engine(batch["points"])
        return nn.functional.cross_entropy(logits.float(), batch["labels"], label_smoothing=0.1)


class BrokenClassifier(SmoothedClassifier):
    """A subclass with a bug: it scales the loss."""

    def compute_loss(self, batch):
        return 1.5 * super().compute_loss(batch)


def reference_loss(engine, batch):
    """What the loop should compute, written against the bare engine."""
    logits = engine(batch["points"])
    return nn.functional.cross_entropy(logits.float(), batch["labels"], label_smoothing=0.1)


def loop_factory(loop_class, config):
    def make_loop(model):
        return loop_class(model, config, train_data=Blobs(), output_dir=tempfile.mkdtemp(), max_steps=STEPS,
                          log=LogSettings(every=1, progress_bar=False))
    return make_loop


def check_loop(rank, loop_class, config, rel, fp16):
    if fp16:
        with fp16_on_cpu():
            return check_loop(rank, loop_class, config, rel, fp16=False)
    result = assert_matches_engine_loop(loop_factory(loop_class, config), make_model, config, Blobs(), STEPS,
                                        rel=rel, loss=reference_loss)
    return len(result.micro_losses)


# rel 0, bit for bit: the loop and the reference run the same engine on the same batches and
# compute the same loss, in fp16 as in fp32.


@pytest.mark.multirank
@pytest.mark.parametrize("stage", [0, 3])
def test_loop_matches_engine_loop_on_two_ranks(stage):
    assert run_ranks(check_loop, 2, SmoothedClassifier, tiny_config(stage=stage), 0.0, False) == [STEPS] * 2


@pytest.mark.multirank
def test_loop_matches_engine_loop_in_fp16_on_cpu():
    config = tiny_config(stage=2, precision="fp16")
    assert run_ranks(check_loop, 2, SmoothedClassifier, config, 0.0, True) == [STEPS] * 2


def test_loop_matches_engine_loop_single_process():
    with single_process():
        assert check_loop(0, SmoothedClassifier, tiny_config(), 0.0, False) == STEPS


@pytest.mark.multirank
def test_a_broken_subclass_fails_with_the_rank_traceback():
    with pytest.raises(RankFailure) as info:
        run_ranks(check_loop, 2, BrokenClassifier, tiny_config(stage=3), 1e-6, False)
    message = str(info.value)
    assert f"rank {info.value.rank} of 2 failed" in message
    assert "AssertionError: micro-batch 0: loop loss" in message
    assert "check_loop" in message  # the failing rank's own traceback

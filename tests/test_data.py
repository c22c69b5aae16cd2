"""Data as users bring it: every kind split across ranks, batched at the configured size.

The multi-rank tests record the sample ids every rank trained on, micro-batch by
micro-batch, and compare them with the global order the loop promises: per epoch a
permutation seeded by ``seed + epoch`` (or the stream's own order), cut into global
micro-batches of micro-batch x ranks samples, rank r taking the r-th slice.
"""

import logging
import tempfile

import pytest
import torch
from helpers import make_model
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from zeroloop import ConfigError, LogSettings, TrainerLoop
from zeroloop.data import (GlobalBatchSampler, PerRankBatches, ShardedStream, epoch_order, rank_batches,
                           rank_slice)
from zeroloop.testing import run_ranks, single_process, tiny_config

QUIET = LogSettings(every=1, progress_bar=False)
SEED = 3


class IdData(Dataset):
    """Regression samples that carry their index as ``id``."""

    def __init__(self, n: int = 20, dim: int = 8):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "id": i}


class IdStream(IterableDataset):
    """The same samples as a stream. ``split_by_worker``: it splits itself between loader
    workers, the way torch's docs show (zeroloop must still see every sample once)."""

    def __init__(self, n: int = 20, split_by_worker: bool = False):
        self.data = IdData(n)
        self.split_by_worker = split_by_worker

    def __iter__(self):
        info = get_worker_info()
        indices = range(len(self.data))
        if self.split_by_worker and info is not None:
            indices = indices[info.id::info.num_workers]
        return (self.data[i] for i in indices)


def collate_with_worker(samples):
    """A user's collate_fn: default batching plus the worker that made the batch."""
    batch = torch.utils.data.default_collate(samples)
    info = get_worker_info()
    batch["worker"] = -1 if info is None else info.id
    return batch


class Recording(TrainerLoop):
    """Records each micro-batch's sample ids (and the worker that made it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def compute_loss(self, batch):
        self.seen.append({"epoch": self.epoch, "ids": batch["id"].tolist(), "worker": batch.get("worker")})
        return self.engine(batch["x"], batch["y"])


def train(data, config, **kwargs):
    kwargs.setdefault("max_steps", None)
    loop = Recording(make_model(), config, train_data=data, output_dir=tempfile.mkdtemp(), seed=SEED, log=QUIET,
                     **kwargs)
    summary = loop.train()
    return {"seen": loop.seen, "samples": summary.samples, "steps": summary.steps, "epochs": summary.epochs,
            "warnings": summary.warnings, "losses": [h["loss"] for h in summary.history]}


def every_kind_ranks(rank):
    import deepspeed

    deepspeed.init_distributed()  # one process group for every loop
    config = tiny_config(micro=2)
    data = IdData(22)  # 22 = 5 global micro-batches of 4, and a ragged tail of 2 that training drops
    return {
        "dataset": train(data, config, epochs=2),
        "list": train([data[i] for i in range(len(data))], config, epochs=2),
        "loader": train(DataLoader(data, batch_size=2, shuffle=True, num_workers=2, collate_fn=collate_with_worker),
                        config, epochs=2),
        "sequential loader": train(DataLoader(data, batch_size=2), config, epochs=1),
        "stream": train(IdStream(22), config, epochs=2),
        "stream loader": train(DataLoader(IdStream(22, split_by_worker=True), batch_size=2, num_workers=2,
                                          collate_fn=collate_with_worker), config, epochs=1),
        # One-shot iterators: rank 0 has 5 batches, rank 1 has 4; both stop after 4 micro-steps, and say so.
        "per rank": train(PerRankBatches(iter([{"x": data.x[i:i + 2], "y": data.y[i:i + 2],
                                                "id": torch.tensor([i, i + 1])} for i in range(0, 10 - 2 * rank, 2)])),
                          config, max_steps=6),
        # A re-iterable list: an epoch ends where the first rank runs out, and the next one begins.
        "per rank lists": train(PerRankBatches([{"x": data.x[i:i + 2], "y": data.y[i:i + 2],
                                                 "id": torch.tensor([i, i + 1])} for i in range(0, 10 - 2 * rank, 2)]),
                                config, max_steps=6),
    }


def global_batches(results, kind):
    """Per micro-step, the ids of the global micro-batch (rank 0's slice, then rank 1's)."""
    per_rank = [result[kind]["seen"] for result in results]
    assert len({len(seen) for seen in per_rank}) == 1, "the ranks took different numbers of micro-steps"
    return [(steps[0]["epoch"], sum((step["ids"] for step in steps), [])) for steps in zip(*per_rank)]


def expected_batches(order_of_epoch, epochs, size=22, group=4):
    batches = []
    for epoch in range(epochs):
        order = order_of_epoch(epoch)
        batches += [(epoch, order[start:start + group]) for start in range(0, size // group * group, group)]
    return batches


@pytest.fixture(scope="module")
def every_kind():
    return run_ranks(every_kind_ranks, 2)


@pytest.mark.multirank
@pytest.mark.parametrize("kind", ["dataset", "list", "loader"])
def test_shuffled_kinds_follow_the_global_order(every_kind, kind):
    batches = global_batches(every_kind, kind)
    assert batches == expected_batches(lambda epoch: epoch_order(22, SEED, epoch, shuffle=True), epochs=2)
    for epoch in (0, 1):  # every sample of the epoch once, but the ragged tail's two
        ids = sorted(sum((b for e, b in batches if e == epoch), []))
        assert len(ids) == 20 and len(set(ids)) == 20
    for result in every_kind:
        assert all(len(step["ids"]) == 2 for step in result[kind]["seen"])  # the configured micro-batch
        assert result[kind]["samples"] == 40 and result[kind]["epochs"] == 2  # 10 micro-steps x 2 x 2 ranks


@pytest.mark.multirank
def test_a_dataloader_keeps_its_workers_and_collate_fn(every_kind):
    for result in every_kind:
        workers = [step["worker"] for step in result["loader"]["seen"]]
        assert set(workers) == {0, 1}  # made by the loader's two workers, with its collate_fn


@pytest.mark.multirank
def test_an_unshuffled_dataloader_keeps_the_dataset_order(every_kind):
    assert global_batches(every_kind, "sequential loader") == expected_batches(lambda epoch: list(range(22)), 1)


@pytest.mark.multirank
@pytest.mark.parametrize("kind,epochs", [("stream", 2), ("stream loader", 1)])
def test_a_stream_is_split_across_ranks_and_workers(every_kind, kind, epochs):
    # The stream's own order; a worker-aware stream read by two workers loses and repeats nothing.
    assert global_batches(every_kind, kind) == expected_batches(lambda epoch: list(range(22)), epochs)
    if kind == "stream loader":
        assert {step["worker"] for step in every_kind[0][kind]["seen"]} == {0, 1}


@pytest.mark.multirank
def test_per_rank_batches_are_used_as_given_and_stop_together(every_kind):
    for rank, result in enumerate(every_kind):
        per_rank = result["per rank"]
        assert [step["ids"] for step in per_rank["seen"]] == [[i, i + 1] for i in range(0, 8, 2)]
        assert per_rank["steps"] == 4 and per_rank["samples"] == 16
        assert len(per_rank["warnings"]) == 1 and "ran out after 4 optimizer steps" in per_rank["warnings"][0]
        assert "max_steps=6" in per_rank["warnings"][0]
        lists = result["per rank lists"]
        assert [(step["epoch"], step["ids"]) for step in lists["seen"]] == \
            [(0, [0, 1]), (0, [2, 3]), (0, [4, 5]), (0, [6, 7]), (1, [0, 1]), (1, [2, 3])]
        assert lists["steps"] == 6 and not lists["warnings"]


# --- the order does not depend on the world size ----------------------------------------------


def world_size_ranks(rank, micro, ga):
    import deepspeed

    deepspeed.init_distributed()
    return train(IdData(40), tiny_config(stage=2, micro=micro, ga=ga, lr=1e-2), max_steps=8)


@pytest.mark.multirank
def test_two_ranks_of_four_train_like_one_rank_of_eight():
    ranks = run_ranks(world_size_ranks, 2, 4, 1)
    two = ranks[0]
    # One rank on the device the two ran on (CPU ranks on a one-GPU machine), so that only
    # the data order can differ, not the arithmetic.
    one = run_ranks(world_size_ranks, 1, 8, 1, device=ranks.device.kind)[0]
    accumulated = run_ranks(world_size_ranks, 1, 4, 2, device=ranks.device.kind)[0]
    assert len(two["losses"]) == len(one["losses"]) == 8  # 40 samples = 5 steps of 8: into epoch 2
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-6)
    assert accumulated["losses"] == pytest.approx(one["losses"], rel=1e-6)
    assert [ids for step in one["seen"] for ids in step["ids"]] == \
        [ids for step in accumulated["seen"] for ids in step["ids"]]


# --- one rank: ready batches, streams that end, bad input ------------------------------------


def one_rank(data, **kwargs):
    kwargs.setdefault("max_steps", 4)
    with single_process():
        return train(data, tiny_config(micro=2), **kwargs)


def test_a_generator_of_batches_on_one_rank_and_its_end_is_reported(caplog):
    data = IdData(6)
    batches = ({"x": data.x[i:i + 2], "y": data.y[i:i + 2], "id": torch.tensor([i, i + 1])} for i in (0, 2, 4))
    with caplog.at_level(logging.WARNING, logger="zeroloop"):
        result = one_rank(batches, max_steps=5)
    assert [step["ids"] for step in result["seen"]] == [[0, 1], [2, 3], [4, 5]]
    assert result["steps"] == 3 and result["samples"] == 6
    assert result["warnings"] and "train_data (generator of batches) ran out after 3 optimizer steps" in \
        result["warnings"][0]
    assert result["warnings"][0] in caplog.text


def test_an_empty_iterable_is_named(tmp_path):
    with pytest.raises(ConfigError, match="train_data.*yielded no batches"):
        one_rank(iter([]))
    with pytest.raises(ConfigError, match="train_data: is empty"):
        one_rank([])


def test_an_unbatchable_sample_is_named_before_the_engine_is_built():
    ragged = [{"x": torch.randn(8 + i), "y": torch.randn(1)} for i in range(4)]
    loop = TrainerLoop(make_model(), tiny_config(micro=2), train_data=ragged, output_dir=tempfile.mkdtemp(),
                       max_steps=1)
    with single_process(), pytest.raises(ConfigError, match=r"train_data: its samples cannot be batched.*"
                                                            r"collate_fn"):
        loop.setup()
    assert loop.engine is None


def test_an_unbatchable_stream_is_named_when_batched():
    class Ragged(IterableDataset):
        def __iter__(self):
            return ({"x": torch.randn(8 + i), "y": torch.randn(1), "id": i} for i in range(4))

    with pytest.raises(TypeError, match="train_data: its samples cannot be batched"):
        one_rank(Ragged())


def test_a_loader_batch_size_contradicting_the_config_names_both():
    with pytest.raises(ConfigError, match=r"train_data: the DataLoader's batch_size=4 contradicts the config's "
                                          r"train_micro_batch_size_per_gpu=2"):
        one_rank(DataLoader(IdData(), batch_size=4))


def test_a_generator_on_two_ranks_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"train_data: a generator of ready batches on 2 ranks is ambiguous.*"
                                          r"PerRankBatches"):
        rank_batches((b for b in []), name="train_data", micro_batch_size=2, rank=0, world_size=2, seed=0,
                     train=True)


def test_problems_with_both_data_arguments_are_reported_together():
    loop = TrainerLoop(make_model(), tiny_config(micro=2), train_data=[], eval_data=DataLoader(IdData(), batch_size=None),
                       output_dir=tempfile.mkdtemp(), max_steps=1)
    with single_process(), pytest.raises(ConfigError) as caught:
        loop.setup()
    assert [p.split(":")[0] for p in caught.value.problems] == ["train_data", "eval_data"]


# --- pure order logic ---------------------------------------------------------------------------


def test_rank_slices_cover_a_group_once():
    group = list(range(8))
    assert [rank_slice(group, r, 2, 4) for r in (0, 1)] == [group[:4], group[4:]]
    tail = list(range(5))  # evaluation's ragged tail: split as evenly as it goes
    assert [list(rank_slice(tail, r, 2, 4)) for r in (0, 1)] == [[0, 1, 2], [3, 4]]
    assert [list(rank_slice([7], r, 2, 4)) for r in (0, 1)] == [[7], []]


def test_evaluation_keeps_the_tail_and_training_drops_it():
    def batches(rank, drop_tail):
        return list(GlobalBatchSampler(11, micro_batch_size=2, rank=rank, world_size=2, seed=0, shuffle=False,
                                       drop_tail=drop_tail))

    assert batches(0, True) == [[0, 1], [4, 5]] and batches(1, True) == [[2, 3], [6, 7]]
    assert batches(0, False) == [[0, 1], [4, 5], [8, 9]] and batches(1, False) == [[2, 3], [6, 7], [10]]
    assert [len(GlobalBatchSampler(11, micro_batch_size=2, rank=r, world_size=2, seed=0, shuffle=False,
                                   drop_tail=d)) for r in (0, 1) for d in (True, False)] == [2, 3, 2, 3]


def test_a_custom_sampler_order_is_kept_and_split():
    order = [5, 3, 1, 0, 2, 4, 7, 6]
    loader = DataLoader(IdData(8), batch_size=2, sampler=order)
    per_rank = [rank_batches(loader, name="train_data", micro_batch_size=2, rank=r, world_size=2, seed=0,
                             train=True) for r in (0, 1)]
    ids = [[batch["id"].tolist() for batch in batches.epoch(0)] for batches in per_rank]
    assert ids == [[[5, 3], [2, 4]], [[1, 0], [7, 6]]]


def test_a_stream_starts_at_a_global_position_on_another_world_size():
    """A position in samples means the same on 1 or 2 ranks: 8 samples consumed by 2 ranks
    x 2 (two micro-steps) continue at sample 8 on 1 rank x 4."""
    stream = ShardedStream(range(20), micro_batch_size=4, rank=0, world_size=1, drop_tail=True)
    stream.skip = 8
    assert list(stream) == list(range(8, 20))


def test_a_stream_loader_position_with_workers():
    batches = rank_batches(DataLoader(IdStream(20), batch_size=2, num_workers=2), name="train_data",
                           micro_batch_size=2, rank=1, world_size=2, seed=0, train=True)
    ids = [batch["id"].tolist() for batch in batches.epoch(0, skip_samples=8)]
    assert ids == [[10, 11], [14, 15], [18, 19]]


# --- evaluation on uneven shares, and a stream resumed mid-epoch ---------------------------------


def eval_and_stream_resume_ranks(rank, root):
    import os

    import deepspeed

    from zeroloop import CheckpointSettings
    from zeroloop.testing import full_parameters

    deepspeed.init_distributed()
    # 9 evaluation samples in micro-batches of 2 on 2 ranks: rank 0 gets [0,1] [4,5] [8], rank 1
    # [2,3] [6,7]: under ZeRO-3 rank 1 must keep joining rank 0's forward passes.
    eval_data = IdData(9)
    loop = Recording(make_model(), tiny_config(stage=3, micro=2), train_data=IdData(8), eval_data=eval_data,
                     output_dir=os.path.join(root, "eval"), max_steps=1, log=QUIET)
    summary = loop.train()
    weights = {name: value.numpy() for name, value in full_parameters(loop.engine).items()}

    def stream_run(name, stop_at=None, **kwargs):
        run = Recording(make_model(), tiny_config(stage=1, micro=2, ga=2, lr=1e-2), train_data=IdStream(40),
                        output_dir=os.path.join(root, name), max_steps=6, seed=SEED, log=QUIET, **kwargs)

        def stop(step, metrics):
            if step == stop_at:
                run.checkpointer.request_stop()

        run.on_step_end = stop
        result = run.train()
        return [h["loss"] for h in result.history], [step["ids"] for step in run.seen]

    settings = CheckpointSettings(final_weights=False)
    straight = stream_run("straight")
    stopped = stream_run("run", stop_at=3, checkpoint=settings)
    resumed = stream_run("run", checkpoint=settings)
    return {"eval_loss": summary.eval_loss, "eval_weights": weights, "straight": straight, "stopped": stopped,
            "resumed": resumed}


@pytest.fixture(scope="module")
def eval_and_stream(tmp_path_factory):
    return run_ranks(eval_and_stream_resume_ranks, 2, str(tmp_path_factory.mktemp("eval_stream")))


@pytest.mark.multirank
def test_zero3_evaluation_counts_every_sample_once_on_uneven_shares(eval_and_stream):
    result = eval_and_stream[0]
    model = make_model()
    model.load_state_dict({name: torch.from_numpy(value) for name, value in result["eval_weights"].items()})
    data = IdData(9)
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(model.net(data.x), data.y).item()
    assert result["eval_loss"] == pytest.approx(expected, rel=1e-6)
    assert eval_and_stream[1]["eval_loss"] == result["eval_loss"]


@pytest.mark.multirank
def test_a_stream_resumed_mid_epoch_continues_exactly(eval_and_stream):
    for result in eval_and_stream:
        straight_losses, straight_ids = result["straight"]
        stopped_losses, stopped_ids = result["stopped"]
        resumed_losses, resumed_ids = result["resumed"]
        assert len(stopped_losses) == 3 and len(resumed_losses) == 3
        assert stopped_losses + resumed_losses == straight_losses
        assert stopped_ids + resumed_ids == straight_ids  # the next unseen samples, none twice

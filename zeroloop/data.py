"""Per-rank data loading and batch handling.

A ``Dataset`` becomes a ``DataLoader`` over a ``DistributedSampler`` (shuffled with the
loop's seed, ``drop_last`` so every rank takes the same number of steps); a ready
``DataLoader`` or any iterable is used as given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """A ``DistributedSampler`` whose next pass can start part-way through the epoch.

    Resuming mid-epoch must continue with the next unseen sample. The order of an epoch
    depends only on (seed, epoch), so dropping the first indices of the re-shuffled order
    reproduces the rest of the epoch without loading the skipped samples.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._skip_next = 0  # samples of this rank to drop from the next pass only

    def skip_next_pass(self, samples: int) -> None:
        """Drop the first ``samples`` indices (this rank's) of the next pass only.

        Raises:
            ValueError: ``samples`` is negative.
        """
        if samples < 0:
            raise ValueError(f"samples: must be >= 0, got {samples}")
        self._skip_next = samples

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self._skip_next = self._skip_next, 0
        return iter(indices[skip:])


def is_map_dataset(data: Any) -> bool:
    return isinstance(data, Dataset) and hasattr(data, "__len__") and not isinstance(data, DataLoader)


def build_loader(data: Any, *, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 train: bool) -> Iterable:
    """The per-rank loader for ``data``.

    Args:
        data: a map-style ``Dataset``, a ``DataLoader`` or any iterable of batches.
        micro_batch_size: samples per rank per micro-step.
        rank, world_size: this rank's place in the data-parallel group.
        seed: the sampler's shuffle seed (all ranks share it; ``set_epoch`` varies it).
        train: shuffle and drop the ragged tail (training), or keep order and every
            sample (evaluation).

    Returns:
        An iterable of batches.

    Raises:
        TypeError: ``data`` is not iterable.
    """
    if is_map_dataset(data):
        sampler = ResumableDistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=train,
                                     seed=seed, drop_last=train)
        return DataLoader(data, batch_size=micro_batch_size, sampler=sampler, drop_last=train)
    if isinstance(data, Iterable):
        return data
    raise TypeError(f"train_data/eval_data must be a torch Dataset, a DataLoader or an iterable of "
                    f"batches, got {type(data).__name__}")


def set_epoch(loader: Iterable, epoch: int) -> None:
    """Reshuffle a distributed sampler for ``epoch``, when the loader has one."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if hasattr(getattr(batch_sampler, "sampler", None), "set_epoch"):
        batch_sampler.sampler.set_epoch(epoch)


def batches_per_epoch(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def move_to_device(batch: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    """Move every tensor in a (nested) batch to ``device``.

    Floating tensors are cast to ``float_dtype`` when given (the engine's bf16/fp16
    compute dtype); integer tensors (token ids, labels) keep their dtype.
    """
    if isinstance(batch, torch.Tensor):
        if float_dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=float_dtype, non_blocking=True)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device, float_dtype) for k, v in batch.items()}
        return moved if type(batch) is dict else type(batch)(moved)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device, float_dtype) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, float_dtype) for v in batch)
    return batch


def iter_tensors(batch: Any):
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from iter_tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from iter_tensors(value)


def count_samples(batch: Any) -> int:
    """Rows in the batch: the leading dimension of its first tensor (0 if none)."""
    for tensor in iter_tensors(batch):
        if tensor.dim() > 0:
            return tensor.shape[0]
    return 0


def count_tokens(batch: Any) -> int | None:
    """Tokens in the batch: elements of ``input_ids`` or of the first integer tensor of
    two or more dimensions ([batch, sequence]); None when the batch carries no tokens."""
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"].numel()
    for tensor in iter_tensors(batch):
        if tensor.dim() >= 2 and not tensor.is_floating_point() and not tensor.is_complex() \
                and tensor.dtype != torch.bool:
            return tensor.numel()
    return None

"""Keeping ranks in step: a flag every rank agrees on, and the batch iterations that must
stop (or pad) together because a rank alone in a collective would hang. Collective."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from .data import count_rows

_END = object()  # what next() returns on an exhausted iterator here


def on_every_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on every rank (one small all-reduce)."""
    return _all_reduce_flag(flag, "MIN", device)


def on_any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (one small all-reduce)."""
    return _all_reduce_flag(flag, "MAX", device)


def _all_reduce_flag(flag: bool, op: str, device: torch.device) -> bool:
    import deepspeed.comm as dist

    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=getattr(dist.ReduceOp, op))
    return bool(value.item())


def while_every_rank_has_one(batches: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """Stop every rank at the first micro-step where any rank has no batch left (ready
    per-rank batches may differ in number)."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, _END)
        if not on_every_rank(batch is not _END, device):
            return
        yield batch


def padded_for_zero3(batches: Iterable[Any], device: torch.device, *, kind: str,
                     rank: int) -> Iterator[tuple[Any, int]]:
    """``(batch, samples)`` of this rank's evaluation batches, then ``(last batch, 0)`` until
    every rank's share is done: under ZeRO-3 every rank takes part in every forward pass.

    Raises:
        RuntimeError: this rank got no batch at all while others did.
    """
    iterator, last = iter(batches), None
    while True:
        batch = next(iterator, _END)
        if not on_any_rank(batch is not _END, device):
            return
        if batch is not _END:
            last = batch
            yield batch, count_rows(batch)
        elif last is None:
            raise RuntimeError(f"{kind}: rank {rank} got no evaluation batch while others did; ZeRO-3 needs "
                               "every rank in every forward pass: pass at least one sample per rank")
        else:
            yield last, 0

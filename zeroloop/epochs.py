"""This rank's walk through the training data, epoch after epoch, from the position a
:class:`~zeroloop.state.TrainState` holds (so a resumed run goes on where the saved one was)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from .data import RankBatches
from .errors import ConfigError
from .rank_sync import while_every_rank_has_one
from .state import TrainState


def micro_batches(state: TrainState, data: RankBatches, *, epochs: int | None, total_steps: int | None,
                  world_size: int, device: torch.device, ran_out: Callable[[], None]) -> Iterator[Any]:
    """This rank's micro-batches across epochs, from the state's position on.

    Every micro-batch is counted in ``state`` as it is handed out. An epoch that yields
    nothing from its start means the data is exhausted (a one-shot iterable): ``ran_out()``
    is called and the iteration ends.
    """
    while epochs is None or state.epoch < epochs:
        if total_steps is not None and state.step >= total_steps:
            return  # resumed at the end: nothing left to train
        start = state.epoch_samples
        batches = data.epoch(state.epoch, start)
        if data.ends_per_rank and world_size > 1:
            batches = while_every_rank_has_one(batches, device)
        for batch in batches:
            state.advance(data.samples_per_micro_step)
            yield batch
        if start == 0 and state.epoch_samples == 0:
            ran_out()
            return
        state.end_epoch()


def ran_out_warning(kind: str, state: TrainState, *, total_steps: int | None, epochs: int | None) -> str:
    """What to tell the user when the data ran out before ``max_steps`` or ``epochs``.

    Raises:
        ConfigError: the data yielded no micro-batch at all.
    """
    if state.micro_steps == 0:
        raise ConfigError([f"{kind}: yielded no batches; pass data with at least one micro-batch per rank"],
                          subject="TrainerLoop arguments")
    wanted = f"max_steps={total_steps}" if total_steps is not None else f"epochs={epochs}"
    return (f"{kind} ran out after {state.step} optimizer steps and {state.epoch} epoch(s), before {wanted}: "
            "a one-shot iterable (a generator) cannot be iterated again; pass a Dataset, a list or a "
            "re-iterable IterableDataset, or fewer steps")

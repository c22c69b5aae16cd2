"""``TrainState``: where a run is, in one object that checkpoints save and restore.

The loop owns it and advances it; the checkpointer saves ``state_dict()`` and restores it
with ``load_state_dict()``, and touches nothing else of the loop. The data position is
global (samples of the epoch consumed over all ranks), so it means the same thing on any
number of ranks: the next unseen sample of the epoch's global order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .config import is_int


@dataclass
class TrainState:
    """The loop's position.

    Attributes:
        step: optimizer steps done (1 after the first).
        epoch: the epoch being trained, from 0 (epochs completed before it).
        epoch_samples: samples of this epoch consumed so far, over all ranks: the global
            position of the next unseen sample in the epoch's order.
        micro_steps: micro-batches consumed (forward passes, skipped ones included).
        samples: samples consumed over all ranks since the run began.
        tokens: tokens consumed over all ranks, as of the last logged step or save (None
            while batches carry no tokens).
        skipped_micro_batches: micro-batches dropped for a non-finite loss.
    """

    step: int = 0
    epoch: int = 0
    epoch_samples: int = 0
    micro_steps: int = 0
    samples: int = 0
    tokens: int | None = None
    skipped_micro_batches: int = 0

    def advance(self, samples: int) -> None:
        """Count one micro-batch of ``samples`` samples (over all ranks) as consumed."""
        self.micro_steps += 1
        self.epoch_samples += samples
        self.samples += samples

    def end_epoch(self) -> None:
        self.epoch += 1
        self.epoch_samples = 0

    def add_tokens(self, tokens: int | None) -> None:
        if tokens is not None:
            self.tokens = (self.tokens or 0) + tokens

    def epochs_completed(self, samples_per_epoch: int | None) -> int:
        """Whole epochs done: ``epoch``, plus the current one when its last sample has been
        consumed (the run stopped before the loader could say it was exhausted)."""
        done = samples_per_epoch is not None and 0 < samples_per_epoch <= self.epoch_samples
        return self.epoch + int(done)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: a key is missing or unknown, or a count is not a whole number >= 0.
        """
        names = {f.name for f in fields(self)}
        problems = [f"{key}: unknown" for key in state if key not in names]
        problems += [f"{name}: missing" for name in names if name not in state]
        for name in names & state.keys():
            value = state[name]
            if not (value is None and name == "tokens") and not (is_int(value) and value >= 0):
                problems.append(f"{name}: must be a whole number >= 0, got {value!r}")
        if problems:
            raise ValueError(f"not a TrainState: {'; '.join(problems)}")
        for name in names:
            setattr(self, name, state[name])

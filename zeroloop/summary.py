"""What the loop reports: how often (:class:`LogSettings`), the loss window between two
logged steps (:class:`LossWindow`, averaged over ranks by :func:`reduce_window`), and what
:meth:`~zeroloop.loop.TrainerLoop.train` returns (:class:`TrainSummary`)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .config import is_positive_int
from .state import TrainState


@dataclass(frozen=True)
class LogSettings:
    """What the loop reports and how often.

    Attributes:
        every: optimizer steps between metrics lines (and progress-bar loss updates). The
            loss is averaged over ranks on these steps only: one small all-reduce each.
        progress_bar: show a tqdm bar on rank 0.
        metrics_file: file name under ``output_dir`` for the JSON-lines metrics.
    """

    every: int = 10
    progress_bar: bool = True
    metrics_file: str = "metrics.jsonl"

    def problems(self) -> list[str]:
        """Every problem with these settings, one line each naming the field and the fix
        (empty when they are good); the loop raises them in one ConfigError."""
        if not is_positive_int(self.every):
            return [f"log.every: must be a positive integer (optimizer steps between metrics lines), "
                    f"got {self.every!r}"]
        return []


@dataclass
class TrainSummary:
    """What :meth:`TrainerLoop.train` returns (the same on every rank).

    Attributes:
        steps: optimizer steps of the run (those before a resume included).
        micro_steps: forward/backward passes of this call.
        epochs: full passes over the training data completed in the run.
        final_loss: the last logged training loss (mean over ranks), nats if cross-entropy.
        eval_loss: the last evaluation loss, or None without ``eval_data``.
        samples, tokens: consumed over all ranks in this call: micro-steps x micro-batch
            size x ranks, as the loop batched them (tokens None when batches carry none).
        wall_time_s: seconds spent in the loop, set-up excluded.
        samples_per_sec, tokens_per_sec: over all ranks, over ``wall_time_s``.
        skipped_steps: optimizer steps of the run skipped for fp16 overflow (DeepSpeed's count).
        skipped_micro_batches: micro-batches of the run dropped for a non-finite loss (policy "skip").
        history: every logged metrics record of this call, in order.
        warnings: what ended or changed the run unexpectedly (e.g. ``train_data`` ran out
            before ``max_steps``); each is also logged.
    """

    steps: int = 0
    micro_steps: int = 0
    epochs: int = 0
    final_loss: float | None = None
    eval_loss: float | None = None
    samples: int = 0
    tokens: int | None = None
    wall_time_s: float = 0.0
    samples_per_sec: float = 0.0
    tokens_per_sec: float | None = None
    skipped_steps: int = 0
    skipped_micro_batches: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LossWindow:
    """This rank's loss and tokens since the last logged step, the loss kept on the device
    so the hot loop never waits for the accelerator."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.micro_steps = 0
        self.tokens: int | None = None
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int | None) -> None:
        self.loss_sum += loss.detach().double()
        self.micro_steps += 1
        if tokens is not None:
            self.tokens = (self.tokens or 0) + tokens


@dataclass
class WindowMeans:
    """A :class:`LossWindow` averaged over ranks (one all-reduce, see :func:`reduce_window`).

    Attributes:
        metrics: ``loss`` (mean over ranks and micro-steps), ``samples_per_sec`` and
            ``tokens_per_sec`` (None when batches carry no tokens).
        new_tokens: every rank's tokens not yet added to ``state.tokens``.
        has_tokens: the batches carry tokens at all.
    """

    metrics: dict[str, Any]
    new_tokens: int
    has_tokens: bool


def reduce_window(window: LossWindow, unsynced_tokens: int, samples_per_micro_step: int) -> WindowMeans:
    """Average the window's loss over ranks and micro-steps, with its throughput; the same
    all-reduce sums the ranks' tokens not yet counted (``unsynced_tokens`` on this rank).
    Collective."""
    import deepspeed.comm as dist

    has_tokens = window.tokens is not None
    stats = torch.tensor([0.0, window.micro_steps, window.tokens or 0, unsynced_tokens],
                         dtype=torch.float64, device=window.device)
    stats[0] = window.loss_sum
    dist.all_reduce(stats)
    elapsed = time.perf_counter() - window.started
    loss_sum, micro_steps, tokens, new_tokens = stats.tolist()
    samples = window.micro_steps * samples_per_micro_step
    metrics = {
        "loss": loss_sum / max(micro_steps, 1),
        "samples_per_sec": samples / elapsed,
        "tokens_per_sec": tokens / elapsed if has_tokens else None,
    }
    return WindowMeans(metrics, int(new_tokens), has_tokens)


def tokens_over_ranks(unsynced_tokens: int, counting: bool, device: torch.device) -> tuple[int, bool]:
    """Every rank's tokens not yet in ``state.tokens`` (``unsynced_tokens`` on this rank), and
    whether any rank counts tokens at all. One all-reduce; collective."""
    import deepspeed.comm as dist

    pending = torch.tensor([unsynced_tokens, int(counting)], dtype=torch.float64, device=device)
    dist.all_reduce(pending)
    return int(pending[0].item()), bool(pending[1].item())


def complete_summary(summary: TrainSummary, state: TrainState, *, wall_time_s: float, samples_before: int,
                     tokens_before: int | None, samples_per_epoch: int | None, skipped_steps: int,
                     warnings: list[str]) -> None:
    """Fill the run's totals into ``summary`` once training ended (``state`` up to date)."""
    summary.steps = state.step
    summary.epochs = state.epochs_completed(samples_per_epoch)
    summary.samples = state.samples - samples_before
    if state.tokens is not None:
        summary.tokens = state.tokens - (tokens_before or 0)
    summary.skipped_steps = skipped_steps
    summary.skipped_micro_batches = state.skipped_micro_batches
    summary.wall_time_s = wall_time_s
    summary.samples_per_sec = summary.samples / wall_time_s
    if summary.tokens is not None:
        summary.tokens_per_sec = summary.tokens / wall_time_s
    summary.warnings = list(warnings)


def grad_norm_of(engine, fallback: float | None = None) -> float | None:
    """The engine's global gradient norm of the last step (``fallback`` when it has none);
    None when unknown or not finite."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = fallback
    if norm is None:
        return None
    norm = float(norm)
    return norm if math.isfinite(norm) else None


def grad_norm_before_step(engine) -> float | None:
    """The global gradient norm, for engines that do not report one.

    Without ZeRO or reduced precision, DeepSpeed clips (or not) without keeping the
    norm. Its gradients are already averaged over ranks at the boundary, so the local
    norm is the global one. Other engines report theirs after ``step()``.
    """
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else None

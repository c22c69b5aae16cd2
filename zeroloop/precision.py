"""Numerical health: fp16 loss scaling made visible, and non-finite losses stopped or skipped.

DeepSpeed's dynamic loss scaler works, but users see it only as "OVERFLOW! Skipping step"
lines and, under ZeRO, the fatal "Current loss scale already at minimum - cannot decrease
scale anymore. Exiting run." zeroloop reads the scaler after every optimizer step, reports
it in the metrics, and stops *before* that exception with the step, the scale history and
the fixes. bf16 and fp32 have no scaler to save them, so a non-finite loss is caught
before ``backward`` instead.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from .config import is_positive_int
from .errors import NumericalHealthError

log = logging.getLogger("zeroloop")

LOSS_SCALE_POLICIES = ("raise", "warn")
NON_FINITE_POLICIES = ("raise", "skip", "off")
FIXES = ("switch to bf16 where the hardware has it (no loss scaling needed); lower the learning rate; "
         "clip gradients (gradient_clipping); check the data for extreme or corrupt batches")


@dataclass(frozen=True)
class HealthPolicy:
    """What the loop does when the numbers go bad.

    Attributes:
        loss_scale: under fp16, when the dynamic scale sits at ``min_loss_scale`` after an
            overflow (DeepSpeed's next overflow would end the run) or after
            ``max_consecutive_overflows`` overflowing steps in a row: ``"raise"`` stops with a
            :class:`NumericalHealthError`; ``"warn"`` logs and keeps going (DeepSpeed is then
            told not to raise at the minimum scale, and skips those steps).
        max_consecutive_overflows: overflowing optimizer steps (fp16), or skipped
            micro-batches (``non_finite="skip"``), in a row that count as persistent and stop
            the run whatever the policy (gpt-neox uses 50).
        non_finite: under bf16/fp32, a NaN or infinite loss: ``"raise"`` stops every rank at
            the end of that optimizer step with the step, rank and batch index (one small
            all-reduce per optimizer step); ``"skip"`` drops that micro-batch on every rank (no
            backward, no step) and counts it, at the price of one small all-reduce per
            micro-batch; ``"off"`` does not check.
    """

    loss_scale: str = "raise"
    max_consecutive_overflows: int = 50
    non_finite: str = "raise"

    def problems(self) -> list[str]:
        """Every problem with this policy, one line each naming the field and the fix
        (empty when it is good); the loop raises them in one ConfigError."""
        found = []
        if self.loss_scale not in LOSS_SCALE_POLICIES:
            found.append(f"health.loss_scale: must be one of {', '.join(LOSS_SCALE_POLICIES)}, got {self.loss_scale!r}")
        if self.non_finite not in NON_FINITE_POLICIES:
            found.append(f"health.non_finite: must be one of {', '.join(NON_FINITE_POLICIES)}, got {self.non_finite!r}")
        if not is_positive_int(self.max_consecutive_overflows):
            found.append(f"health.max_consecutive_overflows: must be a positive integer, "
                         f"got {self.max_consecutive_overflows!r}")
        return found


@dataclass
class ScalerState:
    """DeepSpeed's loss scaler, read in one shape whatever optimizer wraps it."""

    scale: float
    min_scale: float | None  # None for a static scale
    hysteresis: int | None  # overflows left before the scale drops (ZeRO's scaler only)
    delayed_shift: int | None
    clean_steps: int | None  # optimizer steps since the last overflow

    def at_minimum(self) -> bool:
        """True when the next overflow cannot lower the scale any more."""
        if self.min_scale is None or self.scale > self.min_scale:
            return False
        return self.hysteresis is None or self.hysteresis <= 1 or self.delayed_shift == 1


def read_scaler(optimizer: Any) -> ScalerState | None:
    """The fp16 loss scaler of a DeepSpeed optimizer, or None without one.

    ZeRO 1-3 and the unfused fp16 optimizer keep a ``loss_scaler`` (``DynamicLossScaler`` with
    hysteresis); the fused ``FP16_Optimizer`` (no ZeRO) keeps a ``loss_scale_config``.
    """
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is not None and hasattr(scaler, "cur_scale"):
        dynamic = getattr(scaler, "dynamic", False)
        return ScalerState(
            scale=float(scaler.cur_scale),
            min_scale=float(scaler.min_scale) if dynamic else None,
            hysteresis=getattr(scaler, "cur_hysteresis", None) if dynamic else None,
            delayed_shift=getattr(scaler, "delayed_shift", None) if dynamic else None,
            clean_steps=(scaler.cur_iter - scaler.last_overflow_iter - 1) if dynamic else None,
        )
    config = getattr(optimizer, "loss_scale_config", None)
    if config is not None and getattr(config, "use_grad_scaling", False):
        dynamic = config.dynamic_loss_scale
        return ScalerState(
            scale=float(config.cur_scale),
            min_scale=float(config.min_loss_scale) if dynamic else None,
            hysteresis=None, delayed_shift=None,
            clean_steps=(config.cur_iter - config.last_overflow_iter - 1) if dynamic else None,
        )
    return None


class LossScaleMonitor:
    """Watches the fp16 loss scale after every optimizer step and applies the policy.

    Args:
        engine: a DeepSpeed engine with fp16 enabled.
        policy: the health policy.
    """

    HISTORY = 20  # scales kept for the error message

    def __init__(self, engine, policy: HealthPolicy):
        self.engine = engine
        self.policy = policy
        self.consecutive_overflows = 0
        self.history: deque[tuple[int, float, bool]] = deque(maxlen=self.HISTORY)
        if policy.loss_scale == "warn":
            self._let_deepspeed_continue_at_minimum()

    def _let_deepspeed_continue_at_minimum(self) -> None:
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        if hasattr(scaler, "raise_error_at_min_scale"):
            scaler.raise_error_at_min_scale = False

    def after_step(self, step: int) -> dict[str, Any]:
        """Read the scaler after optimizer step ``step``; raise or warn per the policy.

        Returns:
            ``loss_scale`` (the scale now in force), ``overflow`` (this step was skipped) and
            ``skipped_steps`` (overflowing steps so far).

        Raises:
            NumericalHealthError: the policy is "raise" and the scale is stuck.
        """
        state = read_scaler(self.engine.optimizer)
        overflow = not self.engine.was_step_applied()
        self.consecutive_overflows = self.consecutive_overflows + 1 if overflow else 0
        self.history.append((step, state.scale, overflow))
        problem = self._problem(state, overflow)
        if problem:
            self._act(problem, step)
        return {"loss_scale": state.scale, "overflow": overflow, "skipped_steps": int(self.engine.skipped_steps)}

    def _problem(self, state: ScalerState, overflow: bool) -> str | None:
        if overflow and state.at_minimum():
            return (f"the fp16 loss scale is at its minimum ({state.min_scale:g}) and the step overflowed; "
                    "DeepSpeed would end the run at the next overflow")
        if self.consecutive_overflows >= self.policy.max_consecutive_overflows:
            return f"{self.consecutive_overflows} optimizer steps in a row overflowed"
        return None

    def _act(self, problem: str, step: int) -> None:
        scales = ", ".join(f"{s}:{scale:g}{'*' if o else ''}" for s, scale, o in self.history)
        message = (f"fp16 training is unstable at step {step}: {problem}. Recent steps (step:scale, * = "
                   f"overflow): {scales}. Try: {FIXES}.")
        if self.policy.loss_scale == "raise":
            raise NumericalHealthError(message + " (HealthPolicy(loss_scale='warn') keeps going instead.)")
        if self.consecutive_overflows in (self.policy.max_consecutive_overflows, 1) or step % 100 == 0:
            log.warning(message)


class NonFiniteGuard:
    """Watches micro-batch losses under bf16/fp32: :meth:`should_skip` before each
    ``backward``, :meth:`check_step` after each optimizer step."""

    def __init__(self, policy: HealthPolicy, rank: int):
        self.policy = policy
        self.rank = rank
        self.skipped = 0  # micro-batches dropped

    def should_skip(self, loss: torch.Tensor, step: int, batch_index: int, epoch: int) -> bool:
        return False

    def check_step(self, step: int) -> None:
        """Raises :class:`NumericalHealthError` when the policy says so."""


class RaiseOnNonFinite(NonFiniteGuard):
    """Policy "raise": stop every rank at the end of the optimizer step in which a
    micro-batch had a non-finite loss on any rank, before anything is logged or saved from it.

    Each loss is noted on the device as it comes; once per optimizer step the ranks agree
    through one all-reduce of a (world size x 2) tensor, rank r's row holding its first bad
    micro-batch of the step (position + 1, 0 for none) and that loss. Every rank then raises
    the same error. Alone, the rank that saw it would raise and leave the others to die in
    their next collective with a transport error. (Per micro-batch, the all-reduce cost 2.5%
    of a step on 2 CPU ranks; once per optimizer step it is one small collective and, on a
    GPU, the one synchronisation per step the check already made:
    benchmarks/results/non_finite_check_cpu.json.)
    """

    def __init__(self, policy: HealthPolicy, rank: int, world_size: int, device: torch.device):
        super().__init__(policy, rank)
        self._pending: list[tuple[torch.Tensor, int, int]] = []  # (loss, batch index, epoch)
        self._rows = torch.zeros(world_size, 2, dtype=torch.float64, device=device)

    def should_skip(self, loss: torch.Tensor, step: int, batch_index: int, epoch: int) -> bool:
        self._pending.append((loss.detach(), batch_index, epoch))
        return False

    def check_step(self, step: int) -> None:
        """Raises :class:`NumericalHealthError` on every rank when any rank saw a non-finite loss."""
        import deepspeed.comm as dist

        pending, self._pending = self._pending, []
        self._rows.zero_()
        if pending:
            losses = torch.stack([loss.reshape(()).double() for loss, *_ in pending])
            bad = ~torch.isfinite(losses)
            first = torch.argmax(bad.to(torch.uint8))  # the first bad one (argmax returns the first maximum)
            any_bad = bad.any()
            self._rows[self.rank, 0] = torch.where(any_bad, first + 1.0, 0.0)
            self._rows[self.rank, 1] = torch.where(any_bad, losses[first], 0.0)
        dist.all_reduce(self._rows)
        rows = self._rows.tolist()
        bad_ranks = [r for r, (position, _) in enumerate(rows) if position > 0]
        if bad_ranks:
            position, loss = rows[bad_ranks[0]]
            # Every rank takes the same number of micro-batches per epoch, so a position within
            # the step is the same batch index and epoch on every rank.
            _, batch_index, epoch = pending[int(position) - 1]
            ranks = f"rank {bad_ranks[0]}" if len(bad_ranks) == 1 else f"ranks {', '.join(map(str, bad_ranks))}"
            raise NumericalHealthError(
                f"non-finite loss ({loss}) at optimizer step {step}, epoch {epoch}, micro-batch {batch_index} "
                f"of the epoch, on {ranks}. Try: lower the learning rate, clip gradients, check that batch for "
                "bad values. HealthPolicy(non_finite='skip') drops such micro-batches instead.")


class SkipNonFinite(NonFiniteGuard):
    """Policy "skip": drop a micro-batch whose loss is not finite on any rank.

    Every rank must drop the same micro-batches, so they agree through one small
    all-reduce per micro-batch (the price of this policy).
    """

    def __init__(self, policy: HealthPolicy, rank: int, world_size: int, device: torch.device):
        super().__init__(policy, rank)
        self.flags = torch.zeros(world_size, dtype=torch.float32, device=device)
        self.consecutive = 0

    def should_skip(self, loss: torch.Tensor, step: int, batch_index: int, epoch: int) -> bool:
        """True if this micro-batch must be dropped (on every rank).

        Raises:
            NumericalHealthError: more than ``max_consecutive_overflows`` in a row.
        """
        import deepspeed.comm as dist

        self.flags.zero_()
        self.flags[self.rank] = (~torch.isfinite(loss.detach())).float().max()
        dist.all_reduce(self.flags)
        bad_ranks = torch.nonzero(self.flags).flatten().tolist()
        if not bad_ranks:
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        where = (f"at optimizer step {step + 1}, epoch {epoch}, micro-batch {batch_index} of the epoch, "
                 f"on rank(s) {bad_ranks}")
        if self.consecutive >= self.policy.max_consecutive_overflows:
            raise NumericalHealthError(
                f"{self.consecutive} micro-batches in a row had non-finite losses (the last {where}); skipping "
                f"cannot help. Try: {FIXES}.")
        if self.rank == 0:
            log.warning("skipped micro-batch %d of epoch %d: non-finite loss on rank(s) %s (%d skipped so far)",
                        batch_index, epoch, bad_ranks, self.skipped)
        return True


def non_finite_guard(policy: HealthPolicy, rank: int, world_size: int, device: torch.device) -> NonFiniteGuard | None:
    """The guard for ``policy.non_finite``, or None for "off"."""
    if policy.non_finite == "raise":
        return RaiseOnNonFinite(policy, rank, world_size, device)
    if policy.non_finite == "skip":
        return SkipNonFinite(policy, rank, world_size, device)
    return None

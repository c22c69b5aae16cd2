"""``TrainerLoop``: the ``engine.backward`` / ``engine.step`` loop and what real runs need.

Read :meth:`TrainerLoop.train` top to bottom: it is the training loop. Everything it
needs is built by :meth:`TrainerLoop.setup` in small steps, before the first batch.
The engine, ZeRO, precision, accumulation and clipping stay DeepSpeed's.

Extend it by overriding :meth:`~TrainerLoop.compute_loss` and the ``on_*`` hooks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from . import runtime
from .activation import ActivationCheckpointing
from .activation import apply as apply_activation_checkpointing
from .checkpoint import Checkpointer, CheckpointSettings
from .config import ConfigError, Hyperparameters, batch_sizes, is_int, load_config, precision_of, resolve_config
from .data import batches_per_epoch, build_loader, count_samples, count_tokens, move_to_device, set_epoch
from .launcher import shield_loader_workers
from .metrics import MetricsLog, ProgressBar
from .precision import HealthPolicy, LossScaleMonitor, NonFiniteGuard, non_finite_guard

log = logging.getLogger("zeroloop")


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


@dataclass
class TrainSummary:
    """What :meth:`TrainerLoop.train` returns (the same on every rank).

    Attributes:
        steps: optimizer steps taken.
        micro_steps: forward/backward passes.
        epochs: full passes over the training data completed.
        final_loss: the last logged training loss (mean over ranks), nats if cross-entropy.
        eval_loss: the last evaluation loss, or None without ``eval_data``.
        samples, tokens: consumed over all ranks (tokens None when batches carry none).
        wall_time_s: seconds spent in the loop, set-up excluded.
        samples_per_sec, tokens_per_sec: over all ranks, over ``wall_time_s``.
        skipped_steps: optimizer steps skipped for fp16 overflow (DeepSpeed's count).
        skipped_micro_batches: micro-batches dropped for a non-finite loss (policy "skip").
        history: every logged metrics record, in order.
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Window:
    """Loss, samples and tokens since the last logged step, kept on the device so the
    hot loop never waits for the accelerator."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.micro_steps = 0
        self.samples = 0
        self.tokens: int | None = None
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int, tokens: int | None) -> None:
        self.loss_sum += loss.detach().double()
        self.micro_steps += 1
        self.samples += samples
        if tokens is not None:
            self.tokens = (self.tokens or 0) + tokens


class TrainerLoop:
    """Train any ``nn.Module`` with a DeepSpeed engine.

    Args:
        model: the model; its trainable parameters go to the optimizer.
        config: a DeepSpeed config dict or the path of a JSON file; ``"auto"`` values are
            filled from ``hparams`` and the world size (see :mod:`zeroloop.config`).
        train_data: a map-style ``Dataset`` (the loop builds a ``DataLoader`` over a
            seeded ``DistributedSampler``), a ready ``DataLoader`` or any iterable of batches.
        eval_data: same kinds as ``train_data``; evaluated every ``eval_every`` steps and
            at the end.
        output_dir: where ``ds_config.resolved.json`` and ``metrics.jsonl`` go.
        max_steps: optimizer steps to train. Either this or ``epochs`` is required; with
            both, training stops at whichever comes first.
        epochs: passes over ``train_data``.
        seed: seeds python, numpy, torch and the sampler's shuffle.
        loss_fn: ``loss_fn(outputs, targets)`` for ``(inputs, targets)`` batches.
        optimizer: a torch optimizer (or a callable taking parameters) instead of the
            config's ``optimizer`` section.
        lr_scheduler: a scheduler (or a callable taking the optimizer) instead of the
            config's ``scheduler`` section.
        hparams: values for the config's ``"auto"`` keys (micro-batch, lr, precision...).
        log: progress bar and metrics settings.
        eval_every: optimizer steps between evaluations (None: only at the end).
        health: what to do about fp16 overflows and non-finite losses (see
            :class:`~zeroloop.precision.HealthPolicy`).
        preflight: before ``deepspeed.initialize``, plan the memory of this model and config
            (:func:`zeroloop.memory.preflight`) and warn on rank 0 when it will not fit the
            memory this process can see, naming the option that would.
        checkpoint: when to save checkpoints and what to resume from (None: no
            checkpoints); see :mod:`zeroloop.checkpoint`.
        activation_checkpointing: an :class:`~zeroloop.activation.ActivationCheckpointing`
            choosing the modules to checkpoint and the backend; applied in :meth:`setup`,
            before ``deepspeed.initialize`` (None: no checkpointing).

    The process group: if it is not initialized when :meth:`setup` runs, the loop starts
    it and :meth:`train` destroys it at the end (every rank then exits cleanly). Start it
    yourself (``deepspeed.init_distributed()``) to keep it after training.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Mapping[str, Any] | str | os.PathLike,
        *,
        train_data: Any,
        eval_data: Any = None,
        output_dir: str | os.PathLike,
        max_steps: int | None = None,
        epochs: int | None = None,
        seed: int = 0,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        hparams: Hyperparameters | None = None,
        log: LogSettings | None = None,
        eval_every: int | None = None,
        health: HealthPolicy | None = None,
        preflight: bool = True,
        checkpoint: CheckpointSettings | None = None,
        activation_checkpointing: ActivationCheckpointing | None = None,
    ):
        self.model = model
        self.config = config
        self.train_data = train_data
        self.eval_data = eval_data
        self.output_dir = os.fspath(output_dir)
        self.max_steps = max_steps
        self.epochs = epochs
        self.seed = seed
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.hparams = hparams or Hyperparameters()
        self.log = log or LogSettings()
        self.eval_every = eval_every
        self.health = health or HealthPolicy()
        self.preflight = preflight
        self.checkpoint = checkpoint
        self.checkpointer: Checkpointer | None = None  # built by setup() when checkpoint is given
        self.activation_checkpointing = activation_checkpointing
        self.activation_handle = None  # removes the activation checkpointing setup() applied

        self.engine = None  # the DeepSpeedEngine, once setup() has run
        self.ds_config: dict | None = None  # the resolved config handed to DeepSpeed
        self.train_loader = None
        self.eval_loader = None
        self.total_steps: int | None = None
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches taken from the current epoch
        self.rank = 0
        self.world_size = 1
        self._owns_process_group = False
        self._metrics_log: MetricsLog | None = None
        self._scale_monitor: LossScaleMonitor | None = None
        self._nonfinite: NonFiniteGuard | None = None

    # --- what subclasses override -----------------------------------------------------

    def compute_loss(self, batch: Any) -> torch.Tensor:
        """The scalar loss of one micro-batch (already on the engine's device).

        The default handles three shapes: with ``loss_fn``, an ``(inputs, targets)``
        batch gives ``loss_fn(engine(inputs), targets)``; otherwise the model is called
        with the batch (``**batch`` for a dict) and its output may be a scalar tensor,
        or carry the loss as ``.loss`` or ``["loss"]`` (Hugging Face style).

        Raises:
            TypeError: the model's output holds no loss; pass ``loss_fn`` or override this.
        """
        if self.loss_fn is not None:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError("loss_fn needs (inputs, targets) batches; got "
                                f"{type(batch).__name__}. Override compute_loss for other shapes")
            inputs, targets = batch
            return self.loss_fn(self.engine(inputs), targets)
        if isinstance(batch, Mapping):
            output = self.engine(**batch)
        elif isinstance(batch, (tuple, list)):
            output = self.engine(*batch)
        else:
            output = self.engine(batch)
        return loss_from_output(output)

    def on_train_start(self) -> None:
        """Called once, after set-up and before the first batch."""

    def on_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        """Called after every optimizer step.

        Args:
            step: optimizer steps done so far (1 after the first).
            metrics: always ``step``, ``epoch`` and ``lr`` (and under fp16 ``loss_scale``,
                ``overflow``, ``skipped_steps``); on logging steps (every ``log.every``) also
                ``loss`` (mean over ranks and micro-steps), ``grad_norm``,
                ``samples_per_sec`` and ``tokens_per_sec``.
        """

    def on_evaluate(self, metrics: dict[str, Any]) -> None:
        """Called after each evaluation with ``{"step", "eval_loss"}``."""

    def on_train_end(self, summary: TrainSummary) -> None:
        """Called once with the summary, before the process group is torn down."""

    # --- the loop -----------------------------------------------------------------------

    def train(self) -> TrainSummary:
        """Run the training loop to ``max_steps`` (or ``epochs``) and return the summary."""
        engine = self.setup()
        if self.checkpointer is not None:
            self.checkpointer.install_signal_handlers()
            # The rank decides when to stop; its DataLoader workers must survive the signal.
            shield_loader_workers(self.train_loader)
            shield_loader_workers(self.eval_loader)
        self.on_train_start()
        bar = ProgressBar(self.total_steps, initial=self.global_step,
                          enabled=self.rank == 0 and self.log.progress_bar)
        summary, window = TrainSummary(), _Window(engine.device)
        started = time.perf_counter()
        try:
            for batch in self._micro_batches():
                batch = self._to_device(batch)
                loss = self.compute_loss(batch)
                if self._nonfinite and self._nonfinite.should_skip(loss, self.global_step, self.batches_in_epoch - 1,
                                                                  self.epoch):
                    continue
                engine.backward(loss)
                # Ask before step(): step() advances the micro-step counter.
                boundary = engine.is_gradient_accumulation_boundary()
                logging_step = boundary and self._is_logging_step(self.global_step + 1)
                norm = self._grad_norm_before_step() if logging_step else None
                engine.step()
                window.add(loss, count_samples(batch), count_tokens(batch))
                summary.micro_steps += 1
                if boundary and self._end_step(summary, window, bar, logging_step, norm):
                    break
            if window.micro_steps:  # a tail since the last logged step
                summary.final_loss = self._reduce_window(window, summary)["loss"]
            bar.close()

            self._complete_summary(summary, time.perf_counter() - started)
            if self.eval_loader is not None and not self._evaluation_due():
                summary.eval_loss = self.evaluate()["eval_loss"]
            if self.checkpointer is not None:
                self.checkpointer.finish()
            self.on_train_end(summary)
        except BaseException:
            bar.close()
            self._finish(clean=False)
            raise
        self._finish()
        return summary

    def _end_step(self, summary: TrainSummary, window: _Window, bar: ProgressBar, logging_step: bool,
                  norm: float | None) -> bool:
        """After an optimizer step: metrics, hooks, evaluation, checkpoint.

        Returns:
            True when training must stop (``max_steps`` reached, or a stop was requested).
        """
        self.global_step += 1
        if self._nonfinite:
            self._nonfinite.check_step(self.global_step)
        metrics = self._step_metrics(summary, window, logging_step, norm)
        bar.update(1, metrics if logging_step else None)
        self.on_step_end(self.global_step, metrics)
        if self._evaluation_due():
            summary.eval_loss = self.evaluate()["eval_loss"]
        if self.checkpointer is not None and self.checkpointer.step_end():
            return True  # stop requested (SIGTERM/SIGINT): saved, leave cleanly
        return self.total_steps is not None and self.global_step >= self.total_steps

    def _step_metrics(self, summary: TrainSummary, window: _Window, logging_step: bool,
                      norm: float | None) -> dict[str, Any]:
        """This step's metrics; on logging steps, also averaged over ranks and written out."""
        metrics = {"step": self.global_step, "epoch": self.epoch, "lr": self.current_lr()}
        if self._scale_monitor:
            metrics.update(self._scale_monitor.after_step(self.global_step))
        if logging_step:
            metrics.update(self._reduce_window(window, summary))
            metrics["grad_norm"] = grad_norm_of(self.engine, fallback=norm)
            self._metrics_log.write(metrics)
            summary.history.append(metrics)
            summary.final_loss = metrics["loss"]
            window.reset()
        return metrics

    def _evaluation_due(self) -> bool:
        return bool(self.eval_every) and self.global_step % self.eval_every == 0

    def _complete_summary(self, summary: TrainSummary, wall_time_s: float) -> None:
        self._close_finished_epoch()
        summary.steps, summary.epochs = self.global_step, self.epoch
        summary.skipped_steps = int(self.engine.skipped_steps)
        summary.skipped_micro_batches = self._nonfinite.skipped if self._nonfinite else 0
        summary.wall_time_s = wall_time_s
        summary.samples_per_sec = summary.samples / wall_time_s
        if summary.tokens is not None:
            summary.tokens_per_sec = summary.tokens / wall_time_s

    def evaluate(self) -> dict[str, Any]:
        """Mean ``compute_loss`` over ``eval_data``, weighted by samples, over all ranks.

        Returns:
            ``{"step": ..., "eval_loss": ...}`` (also written to metrics.jsonl).
        """
        import deepspeed.comm as dist

        engine = self.setup()
        if self.eval_loader is None:
            raise RuntimeError("evaluate() needs eval_data; pass it to TrainerLoop")
        engine.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss*samples, samples
        with torch.no_grad():
            for batch in self.eval_loader:
                batch = self._to_device(batch)
                samples = count_samples(batch) or 1
                totals[0] += self.compute_loss(batch).double() * samples
                totals[1] += samples
        engine.train()
        dist.all_reduce(totals)
        metrics = {"step": self.global_step, "eval_loss": (totals[0] / totals[1].clamp(min=1)).item()}
        self._metrics_log.write(metrics)
        self.on_evaluate(metrics)
        return metrics

    def current_lr(self) -> float | None:
        lrs = self.engine.get_lr()
        return float(lrs[0]) if lrs else None

    # --- set-up, in the order it happens ---------------------------------------------------

    def setup(self):
        """Build everything ``train()`` needs; runs once, later calls return the engine.

        Order: check arguments; prepare the process (rank variables, CPU threads, seeds,
        process group); resolve the config and build the training loader; memory pre-flight;
        activation checkpointing; ``deepspeed.initialize``; health checks, evaluation
        loader, metrics file; resume from a checkpoint.

        Returns:
            The ``DeepSpeedEngine`` (also ``self.engine``).

        Raises:
            ConfigError: bad arguments or config, every problem listed.
        """
        if self.engine is not None:
            return self.engine
        self._check_args()
        self._prepare_process()
        if self.checkpoint is not None:
            self.checkpointer = Checkpointer(self, self.checkpoint)
        self.ds_config = self._resolve_config()
        self._write_resolved_config()
        self._check_memory()
        self._apply_activation_checkpointing()
        self.engine = self._build_engine()
        self._build_health_checks()
        self.eval_loader = self._build_eval_loader()
        self._metrics_log = MetricsLog(os.path.join(self.output_dir, self.log.metrics_file),
                                       enabled=self.rank == 0)
        if self.checkpointer is not None:
            self.checkpointer.resume()
        return self.engine

    def _check_args(self) -> None:
        problems = []
        if self.max_steps is None and self.epochs is None:
            problems.append("max_steps / epochs: give at least one (optimizer steps, or passes over train_data)")
        for name in ("max_steps", "epochs", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                problems.append(f"{name}: must be a positive integer or None, got {value!r}")
        if not is_int(self.log.every) or self.log.every < 1:
            problems.append(f"log.every: must be a positive integer, got {self.log.every!r}")
        if not isinstance(self.model, nn.Module):
            problems.append(f"model: must be a torch.nn.Module, got {type(self.model).__name__}")
        if self.loss_fn is not None and not callable(self.loss_fn):
            problems.append("loss_fn: must be callable as loss_fn(outputs, targets)")
        problems += self.health.problems()
        if problems:
            raise ConfigError(problems, subject="TrainerLoop arguments")

    def _prepare_process(self) -> None:
        import deepspeed.comm as dist

        self._owns_process_group = runtime.init_distributed()
        runtime.seed_everything(self.seed)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def _resolve_config(self) -> dict:
        """Resolve ``"auto"`` and validate; builds the train loader on the way, since the
        scheduler's length depends on the loader's and the loader on the micro-batch."""
        raw = load_config(self.config)
        hp = self.hparams
        loader_batch = getattr(self.train_data, "batch_size", None)
        if hp.micro_batch_size is None and isinstance(loader_batch, int):
            hp = replace(hp, micro_batch_size=loader_batch)
        sizes = batch_sizes(raw, hp, self.world_size)
        problems = []
        if sizes is not None:
            micro, accum = sizes
            self.train_loader = build_loader(self.train_data, micro_batch_size=micro, rank=self.rank,
                                             world_size=self.world_size, seed=self.seed, train=True)
            self.total_steps = self._count_total_steps(accum)
            if self.total_steps == 0:
                problems.append(f"epochs: {self.epochs} epoch(s) of {batches_per_epoch(self.train_loader)} "
                                f"micro-batches make no optimizer step at gradient_accumulation_steps="
                                f"{accum}; use more data, more epochs or max_steps")
        if self.optimizer is not None and "optimizer" in raw:
            problems.append("optimizer: given both to the loop and in the config's \"optimizer\" section; "
                            "remove one of them")
        if self.lr_scheduler is not None and "scheduler" in raw:
            problems.append("scheduler: given both to the loop (lr_scheduler) and in the config's "
                            "\"scheduler\" section; remove one of them")
        try:
            resolved = resolve_config(raw, world_size=self.world_size, hparams=hp, total_steps=self.total_steps,
                                      hidden_size=hidden_size_of(self.model))
        except ConfigError as e:
            raise ConfigError(e.problems + problems, source=e.source) from None
        problems += fp16_support_problems(resolved)
        if problems:
            raise ConfigError(problems)
        return resolved

    def _count_total_steps(self, accum: int) -> int | None:
        if self.epochs is None:
            return self.max_steps
        per_epoch = batches_per_epoch(self.train_loader)
        if per_epoch is None:
            return self.max_steps
        by_epochs = self.epochs * per_epoch // accum
        return by_epochs if self.max_steps is None else min(by_epochs, self.max_steps)

    def _write_resolved_config(self) -> None:
        if self.rank != 0:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "ds_config.resolved.json"), "w", encoding="utf-8") as f:
            json.dump(self.ds_config, f, indent=2, sort_keys=True)

    def _check_memory(self) -> None:
        if not self.preflight or self.rank != 0:
            return
        from .memory import preflight

        warning = preflight(self.model, self.ds_config, self.world_size)
        if warning:
            log.warning(warning)

    def _apply_activation_checkpointing(self) -> None:
        if self.activation_checkpointing is not None:
            self.activation_handle = apply_activation_checkpointing(self.model, self.activation_checkpointing,
                                                                    self.ds_config)

    def _build_engine(self):
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(
            model=self.model,
            model_parameters=[p for p in self.model.parameters() if p.requires_grad],
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            config=self.ds_config,
        )
        return engine

    def _build_health_checks(self) -> None:
        if self.engine.fp16_enabled():
            self._scale_monitor = LossScaleMonitor(self.engine, self.health)
        else:
            self._nonfinite = non_finite_guard(self.health, self.rank, self.world_size, self.engine.device)

    def _build_eval_loader(self):
        if self.eval_data is None:
            return None
        return build_loader(self.eval_data, micro_batch_size=self.engine.train_micro_batch_size_per_gpu(),
                            rank=self.rank, world_size=self.world_size, seed=self.seed, train=False)

    # --- the loop's helpers --------------------------------------------------------------

    def _micro_batches(self):
        """Micro-batches across epochs; the sampler is reshuffled at each epoch start."""
        while self.epochs is None or self.epoch < self.epochs:
            set_epoch(self.train_loader, self.epoch)
            # After a resume, the checkpointer skips what the saved run consumed of this epoch.
            batches = self.train_loader if self.checkpointer is None else \
                self.checkpointer.epoch_batches(self.train_loader)
            for batch in batches:
                self.batches_in_epoch += 1
                yield batch
            if self.batches_in_epoch == 0:
                if self.global_step == 0:
                    raise RuntimeError("train_data yielded no batches: is it empty, or smaller than "
                                       "micro_batch_size x world size (the tail is dropped)?")
                return  # a one-shot iterable is exhausted
            self._end_epoch()

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.batches_in_epoch = 0

    def _close_finished_epoch(self) -> None:
        """Count an epoch whose last batch was the run's last (the loop stopped before the
        loader could say it was exhausted)."""
        if self.batches_in_epoch and self.batches_in_epoch == batches_per_epoch(self.train_loader):
            self._end_epoch()

    def _to_device(self, batch: Any) -> Any:
        return move_to_device(batch, self.engine.device, self._compute_dtype())

    def _compute_dtype(self) -> torch.dtype | None:
        if self.engine.bfloat16_enabled():
            return torch.bfloat16
        if self.engine.fp16_enabled():
            return torch.float16
        return None

    def _reduce_window(self, window: _Window, summary: TrainSummary) -> dict[str, Any]:
        """Average the window's loss over ranks and micro-steps; count samples and tokens."""
        import deepspeed.comm as dist

        has_tokens = window.tokens is not None
        stats = torch.tensor([0.0, window.micro_steps, window.samples, window.tokens or 0],
                             dtype=torch.float64, device=window.device)
        stats[0] = window.loss_sum
        dist.all_reduce(stats)
        elapsed = time.perf_counter() - window.started
        loss_sum, micro_steps, samples, tokens = stats.tolist()
        summary.samples += int(samples)
        if has_tokens:
            summary.tokens = (summary.tokens or 0) + int(tokens)
        return {
            "loss": loss_sum / max(micro_steps, 1),
            "samples_per_sec": samples / elapsed,
            "tokens_per_sec": tokens / elapsed if has_tokens else None,
        }

    def _is_logging_step(self, step: int) -> bool:
        return step % self.log.every == 0 or step == self.total_steps

    def _grad_norm_before_step(self) -> float | None:
        """The global gradient norm, for engines that do not report one.

        Without ZeRO or reduced precision, DeepSpeed clips (or not) without keeping the
        norm. Its gradients are already averaged over ranks at the boundary, so the local
        norm is the global one. Other engines report theirs after ``step()``.
        """
        engine = self.engine
        if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
            return None
        grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else None

    def _finish(self, clean: bool = True) -> None:
        if self._metrics_log is not None:
            self._metrics_log.close()
        runtime.teardown(self.engine, destroy_process_group=self._owns_process_group, barrier=clean)
        # Only now: a launcher forwards SIGTERM again while the ranks save and export, and
        # that must not kill them half-way (the handler ignores a repeated SIGTERM).
        if self.checkpointer is not None:
            self.checkpointer.remove_signal_handlers()


def fp16_support_problems(config: Mapping[str, Any]) -> list[str]:
    """fp16 asked for on a device that refuses it: say so before DeepSpeed does, with the fix."""
    if precision_of(config) != "fp16":
        return []
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.is_fp16_supported():
        return []
    return [f"fp16.enabled: this device ({accelerator.device_name()}) does not support fp16; use "
            "\"bf16\": {\"enabled\": true} or fp32 (tests on a CPU: zeroloop.testing.fp16_on_cpu())"]


def loss_from_output(output: Any) -> torch.Tensor:
    """The loss in a model's output: a scalar tensor, ``.loss`` or ``["loss"]``."""
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if isinstance(loss, torch.Tensor):
        return loss
    raise TypeError(f"the model returned {type(output).__name__} with no loss: return a scalar tensor "
                    "or an object with .loss, pass loss_fn=... for (inputs, targets) batches, or "
                    "override TrainerLoop.compute_loss")


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


def hidden_size_of(model: nn.Module) -> int | None:
    """The model's hidden size when its config names one (Hugging Face or zeroloop GPT)."""
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None

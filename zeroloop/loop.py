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

from . import arguments, runtime
from .activation import ActivationCheckpointing
from .activation import apply as apply_activation_checkpointing
from .autocast import Bf16Choice, choose_for_run, left_to_zeroloop, with_mode
from .checkpoint import Checkpointer, CheckpointSettings, RunFacts
from .errors import CheckpointError, ConfigError
from .compiling import compile_engine, compile_requested, run_problems, setting_problems
from .config import Hyperparameters, batch_sizes, is_positive_int, load_config, precision_of, resolve_config
from .data import RankBatches, count_rows, count_tokens, loader_batch_size, move_to_device, rank_batches
from .launcher import shield_loader_workers
from .metrics import CustomMetrics, MetricsLog, ProgressBar
from .monitors import MonitorFeed, missing_package_problems, with_output_paths
from .ops import announce_builds
from .param_groups import trainable_parameters, weight_decay_groups
from .precision import HealthPolicy, LossScaleMonitor, NonFiniteGuard, non_finite_guard
from .resume import ResumePlan, keep_global_batch
from .state import TrainState

log = logging.getLogger("zeroloop")
_END = object()  # what next() returns on an exhausted iterator here


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


class _Window:
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


class TrainerLoop:
    """Train any ``nn.Module`` with a DeepSpeed engine.

    Args:
        model: the model; its trainable parameters go to the optimizer.
        config: a DeepSpeed config dict or the path of a JSON file; ``"auto"`` values are
            filled from ``hparams`` and the world size (see :mod:`zeroloop.config`).
        train_data: a map-style ``Dataset`` or a list of samples, a ``DataLoader`` (split
            across ranks keeping its settings), an ``IterableDataset`` of samples, or
            :class:`~zeroloop.data.PerRankBatches` of ready batches; every sample of an
            epoch goes to exactly one rank, batched at the configured micro-batch size
            (see :mod:`zeroloop.data`).
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
        weight_decay_groups: give biases and normalization weights no weight decay (two
            optimizer groups, see :meth:`parameter_groups`); False: one group, as a
            hand-written ``deepspeed.initialize(model_parameters=model.parameters())``.
        compile: ``torch.compile`` the model through ``engine.compile()`` (in place, so
            parameter names stay clean): True, a dict of options (``backend``, ``mode``,
            ``fullgraph``, ``dynamic``, ``options``), False, or None to compile exactly
            when the config has a ``"compile"`` section (see :mod:`zeroloop.compiling`).

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
        weight_decay_groups: bool = False,
        compile: bool | Mapping[str, Any] | None = None,
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
        self.compile = compile
        self.weight_decay_groups = weight_decay_groups

        self.engine = None  # the DeepSpeedEngine, once setup() has run
        self.ds_config: dict | None = None  # the resolved config handed to DeepSpeed
        self.state = TrainState()  # the run's position; what checkpoints save and restore
        self.train_batches: RankBatches | None = None  # this rank's micro-batches, built by setup()
        self.eval_batches: RankBatches | None = None
        self.total_steps: int | None = None
        self.rank = 0
        self.world_size = 1
        self._owns_process_group = False
        self._metrics_log: MetricsLog | None = None
        self._scale_monitor: LossScaleMonitor | None = None
        self._nonfinite: NonFiniteGuard | None = None
        self.bf16_choice: Bf16Choice | None = None  # set by setup() when bf16 was left to zeroloop
        self._custom_metrics = CustomMetrics()
        self._monitor: MonitorFeed | None = None
        self._unsynced_tokens = 0  # this rank's tokens not yet added to state.tokens
        self._warnings: list[str] = []  # for the summary: what ended the run unexpectedly

    @property
    def global_step(self) -> int:
        """Optimizer steps done (``state.step``)."""
        return self.state.step

    @property
    def epoch(self) -> int:
        """The epoch being trained, from 0 (``state.epoch``)."""
        return self.state.epoch

    # --- what subclasses override -----------------------------------------------------

    def compute_loss(self, batch: Any) -> torch.Tensor:
        """The scalar loss of one micro-batch (already on the engine's device).

        The default handles three shapes: with ``loss_fn``, an ``(inputs, targets)``
        batch gives ``loss_fn(engine(inputs), targets)``; otherwise the model is called
        with the batch (``**batch`` for a dict) and its output may be a scalar tensor,
        or carry the loss as ``.loss`` or ``["loss"]`` (Hugging Face style).

        Raises:
            TypeError: the model's output holds no loss, or its ``forward`` cannot take the
                batch; the message names ``loss_fn=`` and ``compute_loss``.
        """
        if self.loss_fn is not None:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError("loss_fn needs (inputs, targets) batches; got "
                                f"{type(batch).__name__}. Override compute_loss for other shapes")
            inputs, targets = batch
            return self.loss_fn(self.engine(inputs), targets)
        try:
            if isinstance(batch, Mapping):
                output = self.engine(**batch)
            elif isinstance(batch, (tuple, list)):
                output = self.engine(*batch)
            else:
                output = self.engine(batch)
        except TypeError as e:  # say so when it is the batch's shape (data the loop could not peek at)
            problems = arguments.batch_problems(self.model, batch, None)
            if problems:
                raise TypeError(problems[0]) from e
            raise
        return loss_from_output(output)

    def parameter_groups(self) -> list:
        """What the optimizer is built on (``deepspeed.initialize(model_parameters=...)``).

        Override to group parameters your way: return parameters, or ``{"params": [...],
        ...}`` dicts whose other keys (``lr``, ``weight_decay``...) override the optimizer's
        (the config's ``optimizer.params``, ``"auto"`` resolved) for that group.

        Returns:
            By default the trainable parameters as one group; with
            ``weight_decay_groups=True``, :func:`zeroloop.param_groups.weight_decay_groups`:
            the decayed parameters, then biases and normalization weights with
            ``weight_decay=0.0``.
        """
        if self.weight_decay_groups:
            return weight_decay_groups(self.model)
        return trainable_parameters(self.model)

    def log_metrics(self, metrics: Mapping[str, Any], *, mean_over_ranks: bool = False) -> None:
        """Add your own metrics to the next logged record: ``metrics.jsonl``, the monitors
        and ``summary.history``.

        Call it from :meth:`compute_loss` or any hook, as often as you like: each name is
        reported as its mean over the calls since the last logging step (every
        ``log.every`` optimizer steps; ``on_step_end`` of a logging step still counts).
        Called during :meth:`evaluate` (from ``compute_loss``), the means go into the
        evaluation's record as ``eval_<name>`` instead.

        Args:
            metrics: ``{name: number}``; 0-d tensors are read with ``.item()`` (a device sync).
            mean_over_ranks: also average over ranks (one all-reduce per logging step for all
                such names); every rank must then log the same names. Otherwise rank 0's
                values are reported.

        Raises:
            TypeError: a value is not a number.
        """
        self._custom_metrics.add(dict(metrics), mean_over_ranks)

    def on_train_start(self) -> None:
        """Called once, after set-up and before the first batch."""

    def on_step_end(self, step: int, metrics: dict[str, Any]) -> None:
        """Called after every optimizer step.

        Args:
            step: optimizer steps done so far (1 after the first).
            metrics: always ``step``, ``epoch`` and ``lr`` (and under fp16 ``loss_scale``,
                ``overflow``, ``skipped_steps``); on logging steps (every ``log.every``) also
                ``loss`` (mean over ranks and micro-steps), ``grad_norm``,
                ``samples_per_sec`` and ``tokens_per_sec``. On a logging step the record is
                written after this hook, with what :meth:`log_metrics` added.
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
            for batches in (self.train_batches, self.eval_batches):
                shield_loader_workers(getattr(batches, "loader", getattr(batches, "batches", None)))
        self.on_train_start()
        bar = ProgressBar(self.total_steps, initial=self.state.step,
                          enabled=self.rank == 0 and self.log.progress_bar)
        summary, window = TrainSummary(), _Window(engine.device)
        samples_before, tokens_before = self.state.samples, self.state.tokens
        started = time.perf_counter()
        try:
            for batch in self._micro_batches():
                batch = self._to_device(batch)
                loss = self.compute_loss(batch)
                if self._nonfinite and self._skip_non_finite(loss):
                    continue
                engine.backward(loss)
                # Ask before step(): step() advances the micro-step counter.
                boundary = engine.is_gradient_accumulation_boundary()
                logging_step = boundary and self._is_logging_step(self.state.step + 1)
                norm = self._grad_norm_before_step() if logging_step else None
                engine.step()
                tokens = count_tokens(batch)
                window.add(loss, tokens)
                self._unsynced_tokens += tokens or 0
                summary.micro_steps += 1
                if boundary and self._end_step(summary, window, bar, logging_step, norm):
                    break
            if window.micro_steps:  # a tail since the last logged step
                summary.final_loss = self._reduce_window(window)["loss"]
            bar.close()

            self._complete_summary(summary, time.perf_counter() - started, samples_before, tokens_before)
            if self.eval_batches is not None and not self._evaluation_due():
                summary.eval_loss = self.evaluate()["eval_loss"]
            if self.checkpointer is not None:
                self.checkpointer.finish(progress=self.rank == 0 and self.log.progress_bar)
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
        self.state.step += 1
        if self._nonfinite:
            self._nonfinite.check_step(self.state.step)
        metrics = self._step_metrics(summary, window, logging_step, norm)
        bar.update(1, metrics if logging_step else None)
        self.on_step_end(self.state.step, metrics)
        if logging_step:
            self._write_record(metrics, summary)
        if self._evaluation_due():
            summary.eval_loss = self.evaluate()["eval_loss"]
        if self.checkpointer is not None and self.checkpointer.step_end():
            return True  # stop requested (SIGTERM/SIGINT): saved, leave cleanly
        return self.total_steps is not None and self.state.step >= self.total_steps

    def _step_metrics(self, summary: TrainSummary, window: _Window, logging_step: bool,
                      norm: float | None) -> dict[str, Any]:
        """This step's metrics; on logging steps, also the window's, averaged over ranks."""
        metrics = {"step": self.state.step, "epoch": self.state.epoch, "lr": self.current_lr()}
        if self._scale_monitor:
            metrics.update(self._scale_monitor.after_step(self.state.step))
        if logging_step:
            metrics.update(self._reduce_window(window))
            metrics["grad_norm"] = grad_norm_of(self.engine, fallback=norm)
            summary.final_loss = metrics["loss"]
            window.reset()
        return metrics

    def _write_record(self, metrics: dict[str, Any], summary: TrainSummary) -> None:
        """A logging step's record, with the custom metrics, to metrics.jsonl, the monitors
        and the history."""
        metrics.update(self._custom_metrics.reduce(self.engine.device))
        self._metrics_log.write(metrics)
        self._monitor.write(metrics)
        summary.history.append(metrics)

    def _evaluation_due(self) -> bool:
        return bool(self.eval_every) and self.state.step % self.eval_every == 0

    def _complete_summary(self, summary: TrainSummary, wall_time_s: float, samples_before: int,
                          tokens_before: int | None) -> None:
        self._sync_tokens()
        state = self.state
        summary.steps = state.step
        summary.epochs = state.epochs_completed(self.train_batches.samples_per_epoch())
        summary.samples = state.samples - samples_before
        if state.tokens is not None:
            summary.tokens = state.tokens - (tokens_before or 0)
        summary.skipped_steps = int(self.engine.skipped_steps)
        summary.skipped_micro_batches = state.skipped_micro_batches
        summary.wall_time_s = wall_time_s
        summary.samples_per_sec = summary.samples / wall_time_s
        if summary.tokens is not None:
            summary.tokens_per_sec = summary.tokens / wall_time_s
        summary.warnings = list(self._warnings)

    def evaluate(self) -> dict[str, Any]:
        """Mean ``compute_loss`` over ``eval_data``, weighted by samples, over all ranks.

        Every sample of ``eval_data`` is evaluated once, on one rank. Under ZeRO-3 (where a
        forward pass is collective) a rank whose share ran out repeats its last batch
        with weight 0 until every rank is done.

        Returns:
            ``{"step": ..., "eval_loss": ...}`` (also written to metrics.jsonl).
        """
        import deepspeed.comm as dist

        engine = self.setup()
        if self.eval_batches is None:
            raise RuntimeError("evaluate() needs eval_data; pass it to TrainerLoop")
        # What log_metrics receives while evaluating goes into this record, not the training one.
        training_metrics, self._custom_metrics = self._custom_metrics, CustomMetrics()
        engine.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss*samples, samples
        with torch.no_grad():
            for batch, weight in self._weighted_eval_batches():
                batch = self._to_device(batch)
                totals[0] += self.compute_loss(batch).double() * weight
                totals[1] += weight
        engine.train()
        dist.all_reduce(totals)
        metrics = {"step": self.state.step, "eval_loss": (totals[0] / totals[1].clamp(min=1)).item()}
        logged, self._custom_metrics = self._custom_metrics, training_metrics
        metrics.update({f"eval_{name}": value for name, value in logged.reduce(engine.device).items()})
        self._metrics_log.write(metrics)
        self._monitor.write(metrics)
        self.on_evaluate(metrics)
        return metrics

    def current_lr(self) -> float | None:
        lrs = self.engine.get_lr()
        return float(lrs[0]) if lrs else None

    # --- set-up, in the order it happens ---------------------------------------------------

    def setup(self):
        """Build everything ``train()`` needs; runs once, later calls return the engine.

        Order: check arguments; prepare the process (rank variables, CPU threads, seeds,
        process group); with ``checkpoint=``, pick the checkpoint to resume; resolve the
        config (keeping that checkpoint's global batch, and picking the bf16 mode) and build
        this rank's training and evaluation batches; compare the checkpoint with this run
        (refusing what cannot change); write the resolved config; memory pre-flight;
        activation checkpointing; ``deepspeed.initialize``; ``engine.compile()`` when asked;
        health checks; metrics file; resume from the checkpoint.

        Returns:
            The ``DeepSpeedEngine`` (also ``self.engine``).

        Raises:
            ConfigError: bad arguments or config, every problem listed.
        """
        if self.engine is not None:
            return self.engine
        self._check_args()
        self._prepare_process()
        choice = self._choose_checkpoint()
        self.ds_config = self._resolve_config(choice)
        plan = self._plan_resume(choice)
        self._write_resolved_config()
        self._check_memory()
        self._apply_activation_checkpointing()
        self.engine = self._build_engine()
        if compile_requested(self.compile, self.ds_config):
            compile_engine(self.engine, self.compile)
        self._build_health_checks()
        self._metrics_log = MetricsLog(os.path.join(self.output_dir, self.log.metrics_file),
                                       enabled=self.rank == 0)
        self._monitor = MonitorFeed(self.engine, self.rank)
        if self.checkpoint is not None:
            self._resume(choice, plan)
        return self.engine

    def _check_args(self) -> None:
        problems = []
        if self.max_steps is None and self.epochs is None:
            problems.append("max_steps / epochs: give at least one (optimizer steps, or passes over train_data)")
        for name in ("max_steps", "epochs", "eval_every"):
            value = getattr(self, name)
            if value is not None and not is_positive_int(value):
                problems.append(f"{name}: must be a positive integer or None, got {value!r}")
        problems += arguments.model_problems(self.model)
        problems += arguments.output_dir_problems(self.output_dir)
        problems += arguments.client_problems(self.optimizer, self.lr_scheduler)
        if self.loss_fn is not None and not callable(self.loss_fn):
            problems.append("loss_fn: must be callable as loss_fn(outputs, targets)")
        elif isinstance(self.model, nn.Module) and type(self).compute_loss is TrainerLoop.compute_loss:
            peeked, sample = arguments.first_sample(self.train_data)
            problems += arguments.batch_problems(self.model, sample, self.loss_fn) if peeked else []
        problems += self._settings_problems()
        problems += setting_problems(self.compile)
        if problems:
            raise ConfigError(problems, subject="TrainerLoop arguments")

    def _settings_problems(self) -> list[str]:
        """The problems of every settings object given to the loop (``log``, ``health``,
        ``checkpoint``, ``activation_checkpointing``), each line naming the field."""
        settings = [self.log, self.health, self.checkpoint]
        if isinstance(self.activation_checkpointing, ActivationCheckpointing):
            settings.append(self.activation_checkpointing)
        return [problem for each in settings if each is not None for problem in each.problems()]

    def _prepare_process(self) -> None:
        import deepspeed.comm as dist

        self._owns_process_group = runtime.init_distributed()
        runtime.seed_everything(self.seed)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def _choose_checkpoint(self) -> tuple[str, dict] | None:
        """The checkpoint to resume (collective), before the config is resolved: its global
        batch decides an ``"auto"`` micro-batch and accumulation."""
        if self.checkpoint is None:
            return None
        raw = load_config(self.config)
        node_local = isinstance(raw.get("checkpoint"), Mapping) and raw["checkpoint"].get("use_node_local_storage")
        self.checkpointer = Checkpointer(self.checkpoint, self.output_dir, engine=None, state=self.state, facts=None,
                                         before_save=self._sync_tokens, node_local=node_local is True)
        return self.checkpointer.choose()

    def _resolve_config(self, resume_from: tuple[str, dict] | None = None) -> dict:
        """Resolve ``"auto"`` and validate; builds this rank's batches on the way, since the
        scheduler's length depends on the data's and the batching on the micro-batch. When
        resuming, ``"auto"`` batch sizes keep the checkpoint's global batch."""
        raw = load_config(self.config)
        hp = self.hparams
        loader_batch = loader_batch_size(self.train_data)
        if hp.micro_batch_size is None and loader_batch is not None:
            hp = replace(hp, micro_batch_size=loader_batch)
        if resume_from is not None:
            hp = keep_global_batch(raw, hp, self.world_size, resume_from[1], where=resume_from[0])
        sizes = batch_sizes(raw, hp, self.world_size)
        problems = []
        if sizes is not None:
            micro, accum = sizes
            problems += self._build_batches(micro)
            self.total_steps = self._count_total_steps(accum) if self.train_batches else None
            if self.total_steps == 0:
                problems.append(f"epochs: {self.epochs} epoch(s) of {self.train_batches.micro_batches_per_epoch()} "
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
        problems += fp16_support_problems(resolved) + missing_package_problems(resolved)
        problems += run_problems(self.compile, resolved)
        if problems:
            raise ConfigError(problems)
        return with_output_paths(self._choose_bf16_mode(raw, resolved), self.output_dir)

    def _choose_bf16_mode(self, raw: dict, resolved: dict) -> dict:
        """bf16 left to zeroloop ("auto" or the loop's precision): DeepSpeed's torch_autocast
        or its bf16 mode, by :mod:`zeroloop.autocast`'s rule. An enabled section is kept."""
        if not left_to_zeroloop(raw, resolved):
            return resolved
        self.bf16_choice = choose_for_run(self.model, resolved, self.world_size)
        if self.rank == 0:
            log.info("bf16: %s (%s)", self.bf16_choice.mode, self.bf16_choice.reason)
        return with_mode(resolved, self.bf16_choice.mode)

    def _build_batches(self, micro_batch_size: int) -> list[str]:
        """This rank's training and evaluation batches; the problems found, for ConfigError."""
        problems = []
        for name, data in (("train_data", self.train_data), ("eval_data", self.eval_data)):
            if data is None:
                continue
            try:
                batches = rank_batches(data, name=name, micro_batch_size=micro_batch_size, rank=self.rank,
                                       world_size=self.world_size, seed=self.seed, train=name == "train_data")
            except ConfigError as e:
                problems += e.problems
                continue
            if name == "train_data":
                self.train_batches = batches
            else:
                self.eval_batches = batches
        return problems

    def _count_total_steps(self, accum: int) -> int | None:
        if self.epochs is None:
            return self.max_steps
        per_epoch = self.train_batches.micro_batches_per_epoch()
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

        announce_builds(self.ds_config, self.rank)  # DeepSpeed compiles its C++ ops silently
        engine, _, _, _ = deepspeed.initialize(
            model=self.model,
            model_parameters=self.parameter_groups(),
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

    def _plan_resume(self, resume_from: tuple[str, dict] | None) -> ResumePlan | None:
        """Give the checkpointer this run's facts; compare the checkpoint with this run and
        refuse, before any engine is built, what cannot be resumed."""
        if self.checkpointer is None:
            return None
        self.checkpointer.facts = RunFacts(seed=self.seed, total_steps=self.total_steps, ds_config=self.ds_config,
                                           samples_per_epoch=self.train_batches.samples_per_epoch())
        if resume_from is None:
            return None
        plan = self.checkpointer.plan(resume_from[1])
        if plan.refused:
            raise CheckpointError(f"{resume_from[0]} cannot be resumed by this run: " + "; ".join(plan.refused))
        if plan.changes:
            self._warnings.append(f"resumed {resume_from[0]} with changes: {plan.report()}")
        return plan

    def _resume(self, choice: tuple[str, dict] | None, plan: ResumePlan | None) -> None:
        """Load the chosen checkpoint into the engine; a resumed run's metrics file drops
        the records of steps it will train again."""
        self.checkpointer.engine = self.engine
        if self.checkpointer.resume(choice, plan) is not None:
            self._metrics_log.drop_after(self.state.step)

    # --- the loop's helpers --------------------------------------------------------------

    def _micro_batches(self):
        """This rank's micro-batches across epochs, from the state's position on.

        Every micro-batch is counted in ``state`` as it is handed out. An epoch that yields
        nothing from its start means the data is exhausted (a one-shot iterable): training
        ends there, and says so when ``max_steps`` or ``epochs`` was not reached.
        """
        state, data = self.state, self.train_batches
        while self.epochs is None or state.epoch < self.epochs:
            if self.total_steps is not None and state.step >= self.total_steps:
                return  # resumed at the end: nothing left to train
            start = state.epoch_samples
            batches = data.epoch(state.epoch, start)
            if data.ends_per_rank and self.world_size > 1:
                batches = self._while_every_rank_has_one(batches)
            for batch in batches:
                state.advance(data.samples_per_micro_step)
                yield batch
            if start == 0 and state.epoch_samples == 0:
                self._data_ran_out()
                return
            state.end_epoch()

    def _data_ran_out(self) -> None:
        if self.state.micro_steps == 0:
            raise ConfigError([f"{self.train_batches.kind}: yielded no batches; pass data with at least one "
                               "micro-batch per rank"], subject="TrainerLoop arguments")
        wanted = f"max_steps={self.total_steps}" if self.total_steps is not None else f"epochs={self.epochs}"
        message = (f"{self.train_batches.kind} ran out after {self.state.step} optimizer steps and "
                   f"{self.state.epoch} epoch(s), before {wanted}: a one-shot iterable (a generator) cannot "
                   "be iterated again; pass a Dataset, a list or a re-iterable IterableDataset, or fewer steps")
        self._warnings.append(message)
        if self.rank == 0:
            log.warning(message)

    def _while_every_rank_has_one(self, batches):
        """Stop every rank at the first micro-step where any rank has no batch left (ready
        per-rank batches may differ in number; a rank alone in a collective would hang)."""
        iterator = iter(batches)
        while True:
            batch = next(iterator, _END)
            if not self._on_every_rank(batch is not _END):
                return
            yield batch

    def _weighted_eval_batches(self):
        """``(batch, samples)`` of this rank's share of ``eval_data``; under ZeRO-3 on several
        ranks, padded with ``(last batch, 0)`` until every rank's share is done."""
        batches = self.eval_batches.epoch(0)
        if self.engine.zero_optimization_stage() != 3 or self.world_size == 1:
            yield from ((batch, count_rows(batch)) for batch in batches)
            return
        iterator, last = iter(batches), None
        while True:
            batch = next(iterator, _END)
            if not self._on_any_rank(batch is not _END):
                return
            if batch is not _END:
                last = batch
                yield batch, count_rows(batch)
            elif last is None:
                raise RuntimeError(f"{self.eval_batches.kind}: rank {self.rank} got no evaluation batch while "
                                   "others did; ZeRO-3 needs every rank in every forward pass: pass at least "
                                   "one sample per rank")
            else:
                yield last, 0

    def _on_every_rank(self, flag: bool) -> bool:
        return self._all_reduce_flag(flag, "MIN")

    def _on_any_rank(self, flag: bool) -> bool:
        return self._all_reduce_flag(flag, "MAX")

    def _all_reduce_flag(self, flag: bool, op: str) -> bool:
        import deepspeed.comm as dist

        value = torch.tensor([int(flag)], dtype=torch.int32, device=self.engine.device)
        dist.all_reduce(value, op=getattr(dist.ReduceOp, op))
        return bool(value.item())

    def _skip_non_finite(self, loss: torch.Tensor) -> bool:
        """Ask the non-finite guard about this micro-batch's loss; count it when dropped."""
        index = self.state.epoch_samples // self.train_batches.samples_per_micro_step - 1
        skip = self._nonfinite.should_skip(loss, self.state.step, index, self.state.epoch)
        self.state.skipped_micro_batches += skip
        return skip

    def _to_device(self, batch: Any) -> Any:
        return move_to_device(batch, self.engine.device, self._compute_dtype())

    def _compute_dtype(self) -> torch.dtype | None:
        if self.engine.bfloat16_enabled():
            return torch.bfloat16
        if self.engine.fp16_enabled():
            return torch.float16
        return None

    def _reduce_window(self, window: _Window) -> dict[str, Any]:
        """Average the window's loss over ranks and micro-steps, with its throughput; also
        brings ``state.tokens`` up to date (the same all-reduce)."""
        import deepspeed.comm as dist

        has_tokens = window.tokens is not None
        stats = torch.tensor([0.0, window.micro_steps, window.tokens or 0, self._unsynced_tokens],
                             dtype=torch.float64, device=window.device)
        stats[0] = window.loss_sum
        dist.all_reduce(stats)
        elapsed = time.perf_counter() - window.started
        loss_sum, micro_steps, tokens, unsynced = stats.tolist()
        self._add_synced_tokens(int(unsynced), has_tokens)
        samples = window.micro_steps * self.train_batches.samples_per_micro_step
        return {
            "loss": loss_sum / max(micro_steps, 1),
            "samples_per_sec": samples / elapsed,
            "tokens_per_sec": tokens / elapsed if has_tokens else None,
        }

    def _sync_tokens(self) -> None:
        """Add every rank's tokens since the last sync to ``state.tokens`` (collective; before
        a save and at the end, so a checkpoint's count is exact)."""
        import deepspeed.comm as dist

        pending = torch.tensor([self._unsynced_tokens, int(self.state.tokens is not None or
                                                             self._unsynced_tokens > 0)],
                               dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(pending)
        self._add_synced_tokens(int(pending[0].item()), bool(pending[1].item()))

    def _add_synced_tokens(self, tokens: int, has_tokens: bool) -> None:
        self._unsynced_tokens = 0
        if has_tokens:
            self.state.add_tokens(tokens)

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

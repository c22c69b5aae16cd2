"""``TrainerLoop``: the ``engine.backward`` / ``engine.step`` loop and what real runs need.

Read :meth:`TrainerLoop.train` top to bottom: it is the training loop. Everything it
needs is built by :meth:`TrainerLoop.setup` in small steps, before the first batch.
The engine, ZeRO, precision, accumulation and clipping stay DeepSpeed's.

Extend it by overriding :meth:`~TrainerLoop.compute_loss` and the ``on_*`` hooks.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from . import arguments, runtime
from .activation import ActivationCheckpointing
from .activation import apply as apply_activation_checkpointing
from .autocast import Bf16Choice, bf16_for_run
from .checkpoint import Checkpointer, CheckpointSettings, RunFacts
from .compiling import compile_engine, compile_requested, setting_problems
from .config import Hyperparameters, batch_sizes, load_config
from .data import RankBatches, count_rows, count_tokens, move_to_device
from .epochs import micro_batches, ran_out_warning
from .errors import CheckpointError, ConfigError
from .launcher import shield_loader_workers
from .metrics import CustomMetrics, MetricsLog, ProgressBar
from .monitors import MonitorFeed, with_output_paths
from .ops import announce_builds
from .param_groups import trainable_parameters, weight_decay_groups
from .precision import HealthPolicy, LossScaleMonitor, NonFiniteGuard, non_finite_guard
from .rank_sync import padded_for_zero3
from .resume import ResumePlan
from .run_setup import (build_rank_batches, checked_config, client_conflicts, count_total_steps, hparams_for_run,
                        total_steps_problems, write_resolved_config)
from .state import TrainState
from .summary import (LogSettings, LossWindow, TrainSummary, WindowMeans, complete_summary, grad_norm_before_step,
                      grad_norm_of, reduce_window, tokens_over_ranks)

log = logging.getLogger("zeroloop")


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
        summary, window = TrainSummary(), LossWindow(engine.device)
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
                norm = grad_norm_before_step(engine) if logging_step else None
                engine.step()
                tokens = count_tokens(batch)
                window.add(loss, tokens)
                self._unsynced_tokens += tokens or 0
                summary.micro_steps += 1
                if boundary and self._end_step(summary, window, bar, logging_step, norm):
                    break
            if window.micro_steps:  # a tail since the last logged step
                means = self._window_means(window)
                self._add_synced_tokens(means.new_tokens, means.has_tokens)
                summary.final_loss = means.metrics["loss"]
            bar.close()

            self._sync_tokens()
            complete_summary(summary, self.state, wall_time_s=time.perf_counter() - started,
                             samples_before=samples_before, tokens_before=tokens_before,
                             samples_per_epoch=self.train_batches.samples_per_epoch(),
                             skipped_steps=int(engine.skipped_steps), warnings=self._warnings)
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

    def _end_step(self, summary: TrainSummary, window: LossWindow, bar: ProgressBar, logging_step: bool,
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

    def _step_metrics(self, summary: TrainSummary, window: LossWindow, logging_step: bool,
                      norm: float | None) -> dict[str, Any]:
        """This step's metrics; on logging steps, also the window's, averaged over ranks."""
        metrics = {"step": self.state.step, "epoch": self.state.epoch, "lr": self.current_lr()}
        if self._scale_monitor:
            metrics.update(self._scale_monitor.after_step(self.state.step))
        if logging_step:
            means = self._window_means(window)
            self._add_synced_tokens(means.new_tokens, means.has_tokens)
            metrics.update(means.metrics)
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
        if self.rank == 0:
            write_resolved_config(self.ds_config, self.output_dir)
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
        problems = arguments.run_length_problems(self.max_steps, self.epochs, self.eval_every)
        problems += arguments.model_problems(self.model)
        problems += arguments.output_dir_problems(self.output_dir)
        problems += arguments.client_problems(self.optimizer, self.lr_scheduler)
        if self.loss_fn is not None and not callable(self.loss_fn):
            problems.append("loss_fn: must be callable as loss_fn(outputs, targets)")
        elif isinstance(self.model, nn.Module) and type(self).compute_loss is TrainerLoop.compute_loss:
            peeked, sample = arguments.first_sample(self.train_data)
            problems += arguments.batch_problems(self.model, sample, self.loss_fn) if peeked else []
        problems += arguments.settings_problems(self.log, self.health, self.checkpoint, self.activation_checkpointing)
        problems += setting_problems(self.compile)
        if problems:
            raise ConfigError(problems, subject="TrainerLoop arguments")

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
        hp = hparams_for_run(raw, self.hparams, self.train_data, self.world_size, resume_from)
        sizes = batch_sizes(raw, hp, self.world_size)
        problems = []
        if sizes is not None:
            micro, accum = sizes
            self.train_batches, self.eval_batches, problems = build_rank_batches(
                self.train_data, self.eval_data, micro_batch_size=micro, rank=self.rank, world_size=self.world_size,
                seed=self.seed)
            if self.train_batches:
                self.total_steps = count_total_steps(self.train_batches, epochs=self.epochs, max_steps=self.max_steps,
                                                     accumulation=accum)
                problems += total_steps_problems(self.total_steps, self.train_batches, self.epochs, accum)
        problems += client_conflicts(raw, self.optimizer, self.lr_scheduler)
        resolved = checked_config(raw, hp, world_size=self.world_size, total_steps=self.total_steps, model=self.model,
                                  compile=self.compile, problems=problems)
        return with_output_paths(self._choose_bf16_mode(raw, resolved), self.output_dir)

    def _choose_bf16_mode(self, raw: dict, resolved: dict) -> dict:
        """bf16 left to zeroloop: DeepSpeed's torch_autocast or its bf16 mode (see
        :func:`zeroloop.autocast.bf16_for_run`); sets ``bf16_choice``."""
        resolved, self.bf16_choice = bf16_for_run(self.model, raw, resolved, self.world_size)
        if self.bf16_choice is not None and self.rank == 0:
            log.info("bf16: %s (%s)", self.bf16_choice.mode, self.bf16_choice.reason)
        return resolved

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
        """This rank's micro-batches across epochs, from the state's position on (see
        :func:`zeroloop.epochs.micro_batches`)."""
        return micro_batches(self.state, self.train_batches, epochs=self.epochs, total_steps=self.total_steps,
                             world_size=self.world_size, device=self.engine.device, ran_out=self._data_ran_out)

    def _data_ran_out(self) -> None:
        message = ran_out_warning(self.train_batches.kind, self.state, total_steps=self.total_steps,
                                  epochs=self.epochs)
        self._warnings.append(message)
        if self.rank == 0:
            log.warning(message)

    def _weighted_eval_batches(self):
        """``(batch, samples)`` of this rank's share of ``eval_data``; under ZeRO-3 on several
        ranks, padded with ``(last batch, 0)`` until every rank's share is done."""
        batches = self.eval_batches.epoch(0)
        if self.engine.zero_optimization_stage() != 3 or self.world_size == 1:
            return ((batch, count_rows(batch)) for batch in batches)
        return padded_for_zero3(batches, self.engine.device, kind=self.eval_batches.kind, rank=self.rank)

    def _skip_non_finite(self, loss: torch.Tensor) -> bool:
        """Ask the non-finite guard about this micro-batch's loss; count it when dropped."""
        index = self.state.epoch_samples // self.train_batches.samples_per_micro_step - 1
        skip = self._nonfinite.should_skip(loss, self.state.step, index, self.state.epoch)
        self.state.skipped_micro_batches += skip
        return skip

    def _to_device(self, batch: Any) -> Any:
        """The batch on the engine's device, floats in the engine's 16-bit dtype if it has one."""
        engine = self.engine
        dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None
        return move_to_device(batch, engine.device, dtype)

    def _window_means(self, window: LossWindow) -> WindowMeans:
        """The window averaged over ranks, with every rank's tokens not yet counted (the
        caller adds them to ``state.tokens``). Collective."""
        return reduce_window(window, self._unsynced_tokens, self.train_batches.samples_per_micro_step)

    def _sync_tokens(self) -> None:
        """Add every rank's tokens since the last sync to ``state.tokens`` (collective; before
        a save and at the end, so a checkpoint's count is exact)."""
        counting = self.state.tokens is not None or self._unsynced_tokens > 0
        self._add_synced_tokens(*tokens_over_ranks(self._unsynced_tokens, counting, self.engine.device))

    def _add_synced_tokens(self, tokens: int, has_tokens: bool) -> None:
        self._unsynced_tokens = 0
        if has_tokens:
            self.state.add_tokens(tokens)

    def _is_logging_step(self, step: int) -> bool:
        return step % self.log.every == 0 or step == self.total_steps

    def _finish(self, clean: bool = True) -> None:
        if self._metrics_log is not None:
            self._metrics_log.close()
        runtime.teardown(self.engine, destroy_process_group=self._owns_process_group, barrier=clean)
        # Only now: a launcher forwards SIGTERM again while the ranks save and export, and
        # that must not kill them half-way (the handler ignores a repeated SIGTERM).
        if self.checkpointer is not None:
            self.checkpointer.remove_signal_handlers()


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

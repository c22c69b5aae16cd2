"""What differs between a checkpoint and the run resuming it, and what is done about each.

A checkpoint's manifest records the layout it was saved with (world size, ZeRO stage,
precision, offload), its global batch, its data position and its whole resolved config.
Resuming compares them with this run's and says what changed in one report, never
silently:

- **layout**: another world size, ZeRO stage or offload device loads through DeepSpeed's
  universal checkpoint, converted once (:mod:`zeroloop.universal`). Per-rank RNG states
  cannot be mapped onto another number of ranks: each rank's RNGs are then seeded from
  (seed, step, rank) instead, so the resumed run is reproducible, though its random draws
  (dropout) differ from an uninterrupted run's.
- **batch**: the global batch size is kept. ``"auto"`` micro-batch and accumulation are
  resolved to keep it (the saved global micro-batch when the new world size divides it,
  so every data cut stays where it was); a config that gives another global batch, or a
  data position the new micro-batches cannot start at, is a :class:`ConfigError` listing
  the micro-batch x accumulation choices that work.
- **applied**: settings a load would silently overwrite with the saved ones are set again
  from this run's config after the load: the optimizer's ``lr``, ``betas``, ``eps``,
  ``weight_decay``..., ``gradient_clipping`` and the fp16 loss-scaler window, hysteresis and
  minimum; a DeepSpeed LR schedule continues at its saved position with the new
  parameters. Everything else is read from the config anyway (bucket sizes...).
- **refused**: what cannot change mid-run (precision, optimizer type, a static/dynamic
  loss scale): a :class:`~zeroloop.checkpoint.CheckpointError` names each one and the fix.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .autocast import MODE_SECTIONS, TORCH_AUTOCAST, precision_mode
from .config import AUTO, Hyperparameters, batch_sizes, precision_of, same_value, validate_structure, zero_stage_of
from .errors import ConfigError

log = logging.getLogger("zeroloop")

# Dotted config keys whose change is a layout change (handled by the universal conversion).
LAYOUT_KEYS = ("zero_optimization.stage", "zero_optimization.offload_optimizer", "zero_optimization.offload_param")
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# fp16 loss-scaler settings re-applied to the loaded scaler: config key -> scaler attribute.
SCALER_SETTINGS = {"fp16.loss_scale_window": "scale_window", "fp16.hysteresis": "delayed_shift",
                   "fp16.min_loss_scale": "min_scale", "fp16.consecutive_hysteresis": "consecutive_hysteresis"}
PRECISION_KEYS = ("fp16.enabled", "bf16.enabled", "bfloat16.enabled", "torch_autocast.enabled")
REFUSED = {"optimizer.type": "the optimizer's state does not carry over to another optimizer",
           "fp16.loss_scale": "the saved loss scaler (static or dynamic) continues"}
NEW_RUN = "start a new run instead (another output_dir, or CheckpointSettings(resume=None))"
# Measured with DeepSpeed 0.19.8 (docs/checkpoints.md): its load_checkpoint skips the ZeRO
# state when the optimizer is offloaded to NVMe and copies back only the swapped files, so
# sub-groups kept in memory (below 1 MiB per rank) come back at their initial values.
NVME_OPTIMIZER = ("offload_optimizer device \"nvme\": DeepSpeed's load_checkpoint restores only the optimizer "
                  "sub-groups it swapped to NVMe; those it kept in memory (under 1 MiB per rank) come back at their "
                  "initial values, so the resume would silently train from partly reset weights. Resume with "
                  "offload_optimizer device \"cpu\" (offload_param \"nvme\" resumes exactly), or "
                  "start a new run (another output_dir, or CheckpointSettings(resume=None))")


@dataclass(frozen=True)
class Layout:
    """How a run's training state is split: what decides whether a checkpoint loads natively."""

    world_size: int
    zero_stage: int
    precision: str
    offload_optimizer: str
    offload_param: str

    def describe(self) -> str:
        offload = [f"{what} offload to {device}" for what, device in (("optimizer", self.offload_optimizer),
                                                                      ("parameter", self.offload_param))
                   if device != "none"]
        ranks = f"{self.world_size} rank{'s' * (self.world_size != 1)}"
        return ", ".join([ranks, f"ZeRO-{self.zero_stage}", self.precision] + offload)


def layout_of(ds_config: Mapping[str, Any], world_size: int) -> Layout:
    """The layout of a run with this resolved config on ``world_size`` ranks."""
    zero = ds_config.get("zero_optimization") or {}

    def device(key: str) -> str:
        section = zero.get(key)
        return str(section.get("device") or "none") if isinstance(section, Mapping) else "none"

    return Layout(world_size=int(world_size), zero_stage=zero_stage_of(ds_config), precision=precision_of(ds_config),
                  offload_optimizer=device("offload_optimizer"), offload_param=device("offload_param"))


def loads_natively(saved: Layout, run: Layout) -> bool:
    """DeepSpeed's own per-rank files load: the same layout, or stage 0 on both sides
    (its files hold whole tensors, whatever the world size)."""
    if saved.precision != run.precision:
        return False
    if saved.zero_stage == run.zero_stage == 0:
        return True
    return saved == run


@dataclass
class ResumePlan:
    """How a checkpoint is resumed into this run, and the report of what changed.

    Attributes:
        saved, run: the checkpoint's layout and this run's.
        universal: load through a universal checkpoint (another layout, or the input is one).
        changes: one line per difference, each saying what is done about it.
        refused: differences that cannot be resumed, each with the fix.
        reapply: dotted config keys whose new values are set again after the load.
    """

    saved: Layout
    run: Layout
    universal: bool
    changes: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    reapply: list[str] = field(default_factory=list)

    @property
    def same_ranks(self) -> bool:
        return self.saved.world_size == self.run.world_size

    def report(self) -> str:
        return "; ".join(self.changes)


def saved_layout(manifest: Mapping[str, Any], run: Layout | None = None) -> Layout:
    """The layout a checkpoint was saved with; what its manifest does not record (a config
    it could not hold as JSON) is taken to be ``run``'s."""
    config = manifest.get("ds_config")
    layout = layout_of(config or {}, manifest["world_size"])
    if not config and run is not None:
        layout = replace(layout, precision=run.precision, offload_optimizer=run.offload_optimizer,
                         offload_param=run.offload_param)
    return replace(layout, zero_stage=int(manifest["zero_stage"]))


def plan_resume(manifest: Mapping[str, Any], ds_config: Mapping[str, Any], world_size: int, *,
                seed: int | None = None, total_steps: int | None = None,
                samples_per_epoch: int | None = None) -> ResumePlan:
    """Compare a checkpoint's manifest with this run and decide how to resume.

    Args:
        manifest: the checkpoint's manifest (:func:`zeroloop.checkpoint.read_manifest`).
        ds_config: this run's resolved config.
        world_size: this run's ranks.
        seed, total_steps, samples_per_epoch: this run's (None: not compared).

    Returns:
        The plan; its ``refused`` list is empty when the checkpoint can be resumed.
    """
    run = layout_of(ds_config, world_size)
    saved = saved_layout(manifest, run)
    plan = ResumePlan(saved=saved, run=run,
                      universal=bool(manifest.get("universal")) or not loads_natively(saved, run))
    if saved != run:
        how = "loaded through a universal checkpoint" if plan.universal else "DeepSpeed's files load unchanged"
        plan.changes.append(f"layout {saved.describe()} -> {run.describe()} ({how})")
        if not plan.same_ranks:
            plan.changes.append(f"per-rank RNG states re-seeded from (seed, step, rank): they cannot be mapped "
                                f"from {saved.world_size} to {run.world_size} ranks")
    if "nvme" in (saved.offload_optimizer, run.offload_optimizer):
        plan.refused.append(NVME_OPTIMIZER)
    _precision_change(plan, manifest, ds_config)
    _batch_changes(plan, manifest, ds_config, world_size)
    _config_changes(plan, manifest.get("ds_config") or {}, ds_config, fp16=run.precision == "fp16")
    _run_changes(plan, manifest, seed, total_steps, samples_per_epoch)
    return plan


def _precision_change(plan: ResumePlan, manifest: Mapping[str, Any], ds_config: Mapping[str, Any]) -> None:
    """Refuse another precision, or another bf16 mode (DeepSpeed's bf16 mode keeps an fp32
    master copy in its optimizer, its torch_autocast mode none; neither loads the other's)."""
    saved_config, run = manifest.get("ds_config") or {}, precision_mode(ds_config)
    saved = precision_mode(saved_config) if saved_config else plan.saved.precision
    if saved == run:
        return
    if TORCH_AUTOCAST in (saved, run):
        plan.refused.append(f"saved in {saved} mode, this run's config resolves to {run} mode, and DeepSpeed's "
                            "optimizer states do not carry over between modes: resume in the saved mode "
                            f"({MODE_SECTIONS[saved]} in the config pins it)")
    else:
        plan.refused.append(f"precision {saved} -> {run}: the loss scaler and the weights' dtype do not carry "
                            f"over; set it back to {saved}, or {NEW_RUN}")


def _batch_changes(plan: ResumePlan, manifest: Mapping[str, Any], ds_config: Mapping[str, Any], world: int) -> None:
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    saved_micro, saved_accum = manifest["micro_batch_size"], manifest["gradient_accumulation_steps"]
    if (micro, accum) != (saved_micro, saved_accum):
        total, saved_total = micro * accum * world, saved_train_batch(manifest)
        kept = f"global batch {total} kept" if total == saved_total else f"global batch {saved_total} -> {total}"
        plan.changes.append(f"micro-batch x accumulation {saved_micro} x {saved_accum} -> {micro} x {accum} ({kept})")


def _config_changes(plan: ResumePlan, saved: Mapping[str, Any], new: Mapping[str, Any], fp16: bool) -> None:
    """Sort every changed config key: layout, batch, refused, re-applied or simply taken.

    Args:
        fp16: this run (and so the checkpoint) trains in fp16: the loss-scaler settings matter.
    """
    old_flat, new_flat = flatten(saved), flatten(new)
    for key in sorted(old_flat.keys() | new_flat.keys()):
        old, value = old_flat.get(key), new_flat.get(key)
        if same_value(old, value) or key.startswith(LAYOUT_KEYS) or key in BATCH_KEYS or key in PRECISION_KEYS:
            continue
        change = f"{key} {_show(old)} -> {_show(value)}"
        if key.startswith("fp16.") and not fp16:
            plan.changes.append(f"{change} (no effect: this run does not train in fp16)")
        elif key in REFUSED:
            plan.refused.append(f"{change}: {REFUSED[key]}; set it back to {_show(old)}, or {NEW_RUN}")
        elif key.startswith("optimizer.params.") or key == "gradient_clipping" or key in SCALER_SETTINGS:
            plan.reapply.append(key)
            plan.changes.append(f"{change} (applied: the checkpoint's value would have been used)")
        elif key.startswith("scheduler."):
            plan.reapply.append(key)
            plan.changes.append(f"{change} (applied: the schedule continues at its saved step)")
        elif key == "fp16.initial_scale_power":
            plan.changes.append(f"{change} (no effect: the saved loss scale continues)")
        else:
            plan.changes.append(f"{change} (applied)")


def _run_changes(plan: ResumePlan, manifest: Mapping[str, Any], seed: int | None, total_steps: int | None,
                 samples_per_epoch: int | None) -> None:
    if seed is not None and manifest.get("sampler_seed") not in (None, seed):
        plan.changes.append(f"seed {manifest['sampler_seed']} -> {seed} (the data order changes)")
    if total_steps is not None and manifest.get("total_steps") not in (None, total_steps):
        plan.changes.append(f"total steps {manifest['total_steps']} -> {total_steps} (an \"auto\" scheduler "
                            "length changes the LR schedule)")
    saved_epoch = manifest.get("samples_per_epoch")
    if samples_per_epoch is not None and saved_epoch not in (None, samples_per_epoch):
        plan.changes.append(f"samples per epoch {saved_epoch} -> {samples_per_epoch} (each epoch's ragged tail "
                            "is dropped per global micro-batch; later epochs differ from an uninterrupted run)")


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a nested config (lists are leaves)."""
    if not isinstance(config, Mapping):
        return {prefix[:-1]: config} if prefix else {}
    flat = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, Mapping) else {f"{prefix}{key}": value})
    return flat


def _show(value: Any) -> str:
    return "(unset)" if value is None else repr(value)


# --- the global batch ------------------------------------------------------------------------


def saved_train_batch(manifest: Mapping[str, Any]) -> int:
    """Samples per optimizer step when the checkpoint was saved."""
    if manifest.get("train_batch_size"):
        return int(manifest["train_batch_size"])
    return int(manifest["micro_batch_size"] * manifest["gradient_accumulation_steps"] * manifest["world_size"])


def keep_global_batch(config: Mapping[str, Any], hparams: Hyperparameters, world_size: int,
                      manifest: Mapping[str, Any], where: str) -> Hyperparameters:
    """The hyperparameters that make this run's batch sizes continue the checkpoint's.

    The resolved ``train_batch_size`` must be the saved one, and the saved data position
    a whole number of this run's global micro-batches (micro-batch x ranks). ``"auto"``
    micro-batch and accumulation (not fixed by ``hparams``) are chosen to make it so,
    preferring the saved global micro-batch (every data cut stays where it was), then the
    saved micro-batch.

    Args:
        config: the raw config (with its ``"auto"`` values).
        hparams: the loop's hyperparameters.
        world_size: this run's ranks.
        manifest: the checkpoint's manifest.
        where: the checkpoint, for messages.

    Returns:
        ``hparams``, with ``micro_batch_size`` / ``gradient_accumulation_steps`` filled
        where the config's ``"auto"`` left the choice open.

    Raises:
        ConfigError: no choice open to the config keeps the global batch at the saved
            position; the message lists the choices that would.
    """
    if validate_structure(dict(config)):
        return hparams  # resolve_config reports a broken config in full
    total, position = saved_train_batch(manifest), int(manifest["train_state"]["epoch_samples"])
    sizes = batch_sizes(config, hparams, world_size)
    if sizes is not None and _fits(sizes, world_size, total, position):
        return hparams
    choices = batch_choices(total, world_size, position)
    free_micro = config.get("train_micro_batch_size_per_gpu") == AUTO and hparams.micro_batch_size is None
    free_accum = config.get("gradient_accumulation_steps") == AUTO and hparams.gradient_accumulation_steps is None
    fixed_total = config.get("train_batch_size") not in (None, AUTO)
    if not fixed_total or config["train_batch_size"] == total:
        for micro, accum in _preferred(choices, manifest, world_size):
            if sizes is not None and not free_micro and micro != sizes[0]:
                continue
            if sizes is not None and not free_accum and accum != sizes[1]:
                continue
            if sizes is None and not (free_micro or config.get("train_micro_batch_size_per_gpu") in (None, micro)):
                continue
            candidate = replace(hparams, micro_batch_size=micro if free_micro else hparams.micro_batch_size,
                                gradient_accumulation_steps=accum if free_accum else hparams.gradient_accumulation_steps)
            found = batch_sizes(config, candidate, world_size)
            if found is not None and _fits(found, world_size, total, position):
                return candidate
    problem = _batch_problem(config.get("train_batch_size") if fixed_total else None, sizes, world_size, total,
                             position, choices, manifest, where)
    raise ConfigError([problem], subject="Resuming")


def batch_choices(total: int, world_size: int, position: int) -> list[tuple[int, int]]:
    """Every ``(micro-batch, accumulation)`` with micro x accumulation x ranks = ``total``
    whose global micro-batch divides the data position."""
    if total % world_size:
        return []
    per_rank = total // world_size
    return [(micro, per_rank // micro) for micro in range(1, per_rank + 1)
            if per_rank % micro == 0 and position % (micro * world_size) == 0]


def _fits(sizes: tuple[int, int], world_size: int, total: int, position: int) -> bool:
    micro, accum = sizes
    return micro * accum * world_size == total and position % (micro * world_size) == 0


def _preferred(choices: list[tuple[int, int]], manifest: Mapping[str, Any], world_size: int) -> list[tuple[int, int]]:
    global_micro = manifest["micro_batch_size"] * manifest["world_size"]

    def rank(choice: tuple[int, int]) -> tuple:
        micro = choice[0]
        return (micro * world_size != global_micro, micro != manifest["micro_batch_size"], -micro)

    return sorted(choices, key=rank)


def _batch_problem(config_total: int | None, sizes, world_size: int, total: int, position: int,
                   choices: list[tuple[int, int]], manifest: Mapping[str, Any], where: str) -> str:
    saved = (f"{manifest['micro_batch_size']} x {manifest['gradient_accumulation_steps']} x "
             f"{manifest['world_size']} rank(s)")
    head = f"{where} was saved with a global batch of {total} samples per optimizer step ({saved})"
    if config_total is not None and config_total != total:
        head += f", this run's config sets train_batch_size={config_total}"
    elif sizes is not None and sizes[0] * sizes[1] * world_size != total:
        head += (f", this run's config gives {sizes[0]} x {sizes[1]} x {world_size} rank(s) = "
                 f"{sizes[0] * sizes[1] * world_size}")
    elif sizes is not None:
        head += (f"; it stopped {position} samples into epoch {manifest['train_state']['epoch']} (an epoch can "
                 f"end inside an optimizer step), not a whole number of this run's global micro-batches of "
                 f"{sizes[0] * world_size} ({sizes[0]} x {world_size} ranks)")
    if not choices:
        fix = (f"no micro-batch x accumulation on {world_size} ranks keeps it; resume on a number of ranks that "
               f"divides {total} (and the data position {position})")
    else:
        listed = ", ".join(f"{m} x {a}" for m, a in choices)
        fix = (f"micro-batch x accumulation choices that keep it on {world_size} rank(s): {listed}; set "
               "train_micro_batch_size_per_gpu and gradient_accumulation_steps to one of them, or both to \"auto\"")
    return f"{head}. {fix}. To change the global batch size, {NEW_RUN}"


# --- after the load --------------------------------------------------------------------------


def reapply(engine, ds_config: Mapping[str, Any], keys: list[str]) -> None:
    """Set this run's values again where the load put the checkpoint's back.

    Args:
        engine: the DeepSpeed engine, just loaded.
        ds_config: this run's resolved config.
        keys: dotted config keys to re-apply (:attr:`ResumePlan.reapply`).
    """
    flat = flatten(ds_config)
    optimizer = engine.optimizer
    for key in keys:
        if key.startswith("optimizer.params."):
            name = key.rsplit(".", 1)[1]
            value = tuple(flat[key]) if isinstance(flat.get(key), list) else flat.get(key)
            for group in optimizer.param_groups:
                if name in group and value is not None:
                    group[name] = value
        elif key == "gradient_clipping" and hasattr(optimizer, "clip_grad"):
            optimizer.clip_grad = float(flat.get(key) or 0.0)
        elif key in SCALER_SETTINGS:
            _set_scaler(optimizer, SCALER_SETTINGS[key], flat.get(key))
    if any(key.startswith("scheduler.") or key == "optimizer.params.lr" for key in keys):
        _lr_from_schedule(engine)  # a DeepSpeed schedule, where there is one, decides the lr


def _set_scaler(optimizer, attribute: str, value: Any) -> None:
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is not None and getattr(scaler, "dynamic", False) and value is not None and hasattr(scaler, attribute):
        setattr(scaler, attribute, value)
        if attribute == "delayed_shift":
            scaler.cur_hysteresis = min(scaler.cur_hysteresis, value)


def _lr_from_schedule(engine) -> None:
    """A DeepSpeed schedule's learning rate at its saved position, with its new parameters
    (the load restored the position only; the optimizer still holds the old schedule's lr)."""
    scheduler = engine.lr_scheduler
    if scheduler is None or not hasattr(scheduler, "get_lr") or not hasattr(scheduler, "last_batch_iteration"):
        return
    for group, lr in zip(engine.optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr


def seed_rank(seed: int, step: int, rank: int) -> None:
    """Seed python, numpy and torch from (seed, step, rank): what a rank's RNGs start from
    after a resume onto another number of ranks."""
    value = (seed * 1_000_003 + step) * 1_009 + rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


__all__ = ["Layout", "ResumePlan", "batch_choices", "keep_global_batch", "layout_of", "plan_resume", "reapply"]

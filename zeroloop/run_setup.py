"""The steps of :meth:`TrainerLoop.setup <zeroloop.loop.TrainerLoop.setup>` that need no
engine: the hyperparameters a run resolves its config with, this rank's batches, the run's
length, what the config and the loop's arguments disagree on, and the resolved config on disk.
Pure logic (rank and world size are arguments): testable without spawning ranks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from torch import nn

from .compiling import run_problems
from .config import Hyperparameters, precision_of, resolve_config
from .data import RankBatches, loader_batch_size, rank_batches
from .errors import ConfigError
from .monitors import missing_package_problems
from .resume import keep_global_batch

RESOLVED_CONFIG = "ds_config.resolved.json"


def hparams_for_run(raw: Mapping[str, Any], hparams: Hyperparameters, train_data: Any, world_size: int,
                    resume_from: tuple[str, dict] | None) -> Hyperparameters:
    """``hparams`` with a DataLoader's batch size as the micro-batch (when none is given),
    and, when resuming, ``"auto"`` batch sizes that keep the checkpoint's global batch."""
    loader_batch = loader_batch_size(train_data)
    if hparams.micro_batch_size is None and loader_batch is not None:
        hparams = replace(hparams, micro_batch_size=loader_batch)
    if resume_from is not None:
        hparams = keep_global_batch(raw, hparams, world_size, resume_from[1], where=resume_from[0])
    return hparams


def build_rank_batches(train_data: Any, eval_data: Any, *, micro_batch_size: int, rank: int, world_size: int,
                       seed: int) -> tuple[RankBatches | None, RankBatches | None, list[str]]:
    """This rank's training and evaluation batches (None for data not given or refused), and
    the problems found, for one ConfigError."""
    built, problems = {}, []
    for name, data in (("train_data", train_data), ("eval_data", eval_data)):
        if data is None:
            continue
        try:
            built[name] = rank_batches(data, name=name, micro_batch_size=micro_batch_size, rank=rank,
                                       world_size=world_size, seed=seed, train=name == "train_data")
        except ConfigError as e:
            problems += e.problems
    return built.get("train_data"), built.get("eval_data"), problems


def count_total_steps(train_batches: RankBatches, *, epochs: int | None, max_steps: int | None,
                      accumulation: int) -> int | None:
    """Optimizer steps of the run: ``max_steps``, or what ``epochs`` make of data of known
    length (whichever comes first); None when neither bounds it."""
    per_epoch = train_batches.micro_batches_per_epoch() if epochs is not None else None
    if per_epoch is None:
        return max_steps
    by_epochs = epochs * per_epoch // accumulation
    return by_epochs if max_steps is None else min(by_epochs, max_steps)


def total_steps_problems(total_steps: int | None, train_batches: RankBatches, epochs: int | None,
                         accumulation: int) -> list[str]:
    """Epochs too short to make a single optimizer step."""
    if total_steps != 0:
        return []
    return [f"epochs: {epochs} epoch(s) of {train_batches.micro_batches_per_epoch()} micro-batches make no "
            f"optimizer step at gradient_accumulation_steps={accumulation}; use more data, more epochs or max_steps"]


def checked_config(raw: Mapping[str, Any], hparams: Hyperparameters, *, world_size: int, total_steps: int | None,
                   model: nn.Module, compile: Any, problems: list[str]) -> dict:
    """The config with ``"auto"`` resolved, validated for this run.

    Raises:
        ConfigError: ``problems`` (found earlier in set-up) and the config's, all listed.
    """
    try:
        resolved = resolve_config(raw, world_size=world_size, hparams=hparams, total_steps=total_steps,
                                  hidden_size=hidden_size_of(model))
    except ConfigError as e:
        raise ConfigError(e.problems + problems, source=e.source) from None
    problems = problems + fp16_support_problems(resolved) + missing_package_problems(resolved)
    problems += run_problems(compile, resolved)
    if problems:
        raise ConfigError(problems)
    return resolved


def client_conflicts(raw: Mapping[str, Any], optimizer: Any, lr_scheduler: Any) -> list[str]:
    """An optimizer or scheduler given both to the loop and in the config."""
    problems = []
    if optimizer is not None and "optimizer" in raw:
        problems.append("optimizer: given both to the loop and in the config's \"optimizer\" section; "
                        "remove one of them")
    if lr_scheduler is not None and "scheduler" in raw:
        problems.append("scheduler: given both to the loop (lr_scheduler) and in the config's "
                        "\"scheduler\" section; remove one of them")
    return problems


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


def hidden_size_of(model: nn.Module) -> int | None:
    """The model's hidden size when its config names one (``config.hidden_size`` as Hugging
    Face models and zeroloop's GPT have it, or ``d_model``)."""
    config = getattr(model, "config", None)
    for name in ("hidden_size", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def write_resolved_config(ds_config: Mapping[str, Any], output_dir: str) -> None:
    """``output_dir/ds_config.resolved.json``: the config DeepSpeed was given (rank 0 only)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, RESOLVED_CONFIG), "w", encoding="utf-8") as f:
        json.dump(ds_config, f, indent=2, sort_keys=True)

"""Load a universal checkpoint into an engine of any world size and ZeRO stage.

The folder is one :mod:`zeroloop.universal` wrote, or one DeepSpeed's ``ds_to_universal``
wrote. At stages 1-3 DeepSpeed's own universal loader does the work (each rank cuts its
partition of every parameter); at stage 0, for which DeepSpeed has none, the masters and
moments are copied into the optimizer here. Either way the module's buffers are restored
too, which DeepSpeed's universal loaders leave out.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from .errors import CheckpointError
from .universal import MOMENTS, OPTIMIZER_STATE_FILE, PARAM, model_states_file


def load_universal(engine, folder: str) -> None:
    """Load a universal checkpoint into ``engine``, whatever its world size and ZeRO stage.

    Restores the fp32 master weights, the optimizer moments, step count and
    hyperparameters, the loss scaler, the LR scheduler, DeepSpeed's step counters and
    the module's buffers. Collective: every rank calls it.

    Raises:
        CheckpointError: DeepSpeed could not load the folder (the message says why).
    """
    folder = os.path.abspath(folder)
    try:
        if int(engine.zero_optimization_stage()) == 0:
            _load_stage0(engine, folder)
        else:
            parent, tag = os.path.split(folder)
            with _universal_loading(engine):
                load_path, _ = engine.load_checkpoint(parent, tag=tag)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed found no model states in {folder}")
        _restore_buffers(engine, folder)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - reported with the folder and the fix
        raise CheckpointError(f"DeepSpeed could not load the universal checkpoint {folder}: "
                              f"{type(e).__name__}: {e}") from e


@contextlib.contextmanager
def _universal_loading(engine):
    """DeepSpeed's ``"checkpoint": {"load_universal": true}`` for one ``load_checkpoint`` call
    (its only reader is the load path), so a later load of a native checkpoint stays native."""
    config = engine._config
    saved = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = saved


def _load_stage0(engine, folder: str) -> None:
    """Stage 0 (DeepSpeed has no universal loader for it): masters, moments, step and
    hyperparameters into the optimizer; scheduler and counters as ``load_checkpoint`` does."""
    states = torch.load(model_states_file(folder), map_location="cpu", weights_only=False)
    optim = torch.load(os.path.join(folder, OPTIMIZER_STATE_FILE), map_location="cpu", weights_only=False)
    optimizer = engine.optimizer
    names = {id(p): name for name, p in engine.module.named_parameters()}
    step = optim["optimizer_state_dict"]["state"][0]["step"]
    with torch.no_grad():
        if hasattr(optimizer, "fp32_groups_flat"):  # bf16/fp16: FP16_Optimizer's flat fp32 masters
            for params, flat, lp_flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat,
                                             optimizer.fp16_groups_flat):
                values = {key: torch.cat([_universal_tensor(folder, names[id(p)], key).reshape(-1) for p in params])
                          for key in ("fp32",) + MOMENTS}
                flat.copy_(values["fp32"])
                lp_flat.copy_(flat)
                optimizer.optimizer.state[flat] = _adam_state(optimizer.optimizer, step, values)
            _load_stage0_scaler(optimizer, optim)
        else:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    values = {key: _universal_tensor(folder, names[id(p)], key).view_as(p)
                              for key in ("fp32",) + MOMENTS}
                    p.copy_(values["fp32"])
                    optimizer.state[p] = _adam_state(optimizer, step, values)
    for group, saved in zip(optimizer.param_groups, optim["param_groups"]):
        group.update({key: value for key, value in saved.items() if key != "params"})
    if engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
    engine.global_steps = states["global_steps"]
    engine.global_samples = states.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = states["skipped_steps"]


def _universal_tensor(folder: str, name: str, key: str) -> torch.Tensor:
    path = os.path.join(folder, "zero", name, f"{key}.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the universal checkpoint has no {key} for parameter {name}")
    value = torch.load(path, map_location="cpu", weights_only=False)
    return (value[PARAM] if isinstance(value, dict) else value).float()


def _adam_state(optimizer, step: Any, values: dict[str, torch.Tensor]) -> dict[str, Any]:
    if isinstance(optimizer, torch.optim.Optimizer) and type(optimizer).__module__.startswith("torch.optim"):
        step = torch.tensor(float(step))  # torch's own optimizers keep the step as a tensor
    return {"step": step, "exp_avg": values["exp_avg"].clone(), "exp_avg_sq": values["exp_avg_sq"].clone()}


def _load_stage0_scaler(optimizer, optim: dict) -> None:
    """The saved loss scale into FP16_Optimizer (fp16; bf16 has none)."""
    scaler, config = optim.get("loss_scaler"), getattr(optimizer, "loss_scale_config", None)
    if scaler is None or config is None or not config.use_grad_scaling:
        return
    config.cur_scale = scaler.cur_scale
    config.cur_iter = getattr(scaler, "cur_iter", config.cur_iter)
    if config.dynamic_loss_scale:
        config.last_overflow_iter = getattr(scaler, "last_overflow_iter", config.last_overflow_iter)


def _restore_buffers(engine, folder: str) -> None:
    """The module's buffers (running statistics...): DeepSpeed's universal loaders restore
    only what the optimizer holds."""
    states = torch.load(model_states_file(folder), map_location="cpu", weights_only=False)
    saved = states.get("module") or {}
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            if name in saved and isinstance(saved[name], torch.Tensor) and saved[name].numel() == buffer.numel():
                buffer.copy_(saved[name].view_as(buffer))


__all__ = ["load_universal"]

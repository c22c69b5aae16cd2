"""Rebuild the bias-correction state DeepSpeed's CPU Adam kernels keep outside any checkpoint.

Adam divides by 1 - beta1**t and 1 - beta2**t. DeepSpeed's CPU kernels (``FusedAdam`` on a
CPU, and ``DeepSpeedCPUAdam``, which ZeRO-Offload uses) keep beta**t as a running product
in C++ state that lives as long as the process: each step multiplies it by beta once, but
a jump in the step count (a resume in a new process) makes them recompute it with
``pow()``, which differs from the running product in the last bits; every resumed update
would then be 1 ulp off an uninterrupted run's. Replaying steps 1..t on empty tensors
rebuilds the same running product, so resumed updates are bit-identical. (The CUDA
kernels compute the power from the step on every call and need nothing.)

Where the state lives: ``FusedAdam`` on a CPU calls ``multi_tensor_adam``
(``csrc/adam/fused_adam_frontend.cpp`` with ``cpu_adam_impl.cpp``), whose running product
is per process; ``DeepSpeedCPUAdam`` has one ``Adam_Optimizer`` per instance
(``ds_opt_adam``, keyed by ``opt_id``), whose ``IncrementStep`` keeps ``_betta1_t`` and
``_betta2_t``.
"""

from __future__ import annotations

import torch


def replay_cpu_adam_bias_corrections(engine) -> int:
    """Rebuild the running beta powers of the engine's CPU Adam after its state was loaded.

    Args:
        engine: a DeepSpeed engine whose optimizer state was just loaded.

    Returns:
        The steps replayed: 0 unless the optimizer is DeepSpeed's ``FusedAdam`` on a CPU
        or its ``DeepSpeedCPUAdam``.
    """
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    optimizer = engine.optimizer
    while optimizer is not None and not isinstance(optimizer, (FusedAdam, DeepSpeedCPUAdam)):
        optimizer = getattr(optimizer, "optimizer", None)  # ZeRO wraps the torch optimizer
    if optimizer is None or not optimizer.param_groups:
        return 0
    steps = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
    if not steps:
        return 0
    if isinstance(optimizer, DeepSpeedCPUAdam):
        return _replay_cpu_adam(optimizer, max(steps))
    if engine.device.type != "cpu":
        return 0
    return _replay_fused_adam(optimizer, max(steps))


def _replay_fused_adam(optimizer, steps: int) -> int:
    from deepspeed.ops.adam.fused_adam import multi_tensor_applier

    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    empty = [[torch.empty(0, dtype=torch.float32)] for _ in range(4)]  # grads, params, exp_avg, exp_avg_sq
    for step in range(1, steps + 1):
        multi_tensor_applier(optimizer.multi_tensor_adam, optimizer._dummy_overflow_buf, empty, group["lr"],
                             beta1, beta2, group["eps"], step, optimizer.adam_w_mode,
                             1 if group["bias_correction"] else 0, group["weight_decay"])
    return steps


def _replay_cpu_adam(optimizer, steps: int) -> int:
    """``DeepSpeedCPUAdam.step`` calls ``adam_update`` with each step's count; the same calls
    on empty tensors advance ``IncrementStep``'s running product and update nothing."""
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    empty = torch.empty(0, dtype=torch.float32)
    for step in range(1, steps + 1):
        optimizer.ds_opt_adam.adam_update(optimizer.opt_id, step, group["lr"], beta1, beta2, group["eps"],
                                          group["weight_decay"], group["bias_correction"], empty, empty, empty,
                                          empty)
    return steps


__all__ = ["replay_cpu_adam_bias_corrections"]

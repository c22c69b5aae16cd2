"""The planner's advice: which option to use, why, in words, and which buckets to shrink.

The order is the usual guidance (docs/memory-planner.md): ZeRO-2 has DDP's communication
volume and less memory, so it comes first; DDP only wins when buckets dominate a small
model; ZeRO-3 costs 1.5x the communication; offload costs PCIe traffic, NVMe the most.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..config import is_int
from ..sizes import human
from .model import OptionPlan, PlanInputs

PREFERENCE = ("zero2", "ddp", "zero3", "zero2-offload", "zero3-offload", "zero3-offload-params", "zero3-nvme")
# On one device there is nothing to shard: DDP, then ZeRO-Offload.
PREFERENCE_ONE_DEVICE = ("ddp", "zero2-offload", "zero3-offload", "zero3-offload-params", "zero3-nvme")
# Device memory of common accelerators (16 GB V100/T4, 24 GB A10/L4/RTX 4090, 40 and 80 GB
# A100/H100), for a recommendation per size when none is given.
COMMON_DEVICE_SIZES = (16 * 10**9, 24 * 10**9, 40 * 10**9, 80 * 10**9)


def recommend(options: tuple[OptionPlan, ...], inputs: PlanInputs) -> tuple[str | None, str]:
    """The first option in the guidance order that fits, and one line saying why."""
    by_name = {option.name: option for option in options}
    order = PREFERENCE_ONE_DEVICE if inputs.world_size == 1 else PREFERENCE
    if inputs.device_memory is None:
        at_sizes = ", ".join(f"{human(size)}: {first_fitting(order, by_name, size, inputs) or 'nothing fits'}"
                             for size in COMMON_DEVICE_SIZES)
        return None, (f"no device memory given (device_memory=, or --gpu-memory in `zeroloop plan`, e.g. 80GB); "
                      f"at common device sizes: {at_sizes}")
    for name in order:
        if by_name[name].fits:
            return name, reason_for(by_name[name], by_name, inputs)
    return None, nothing_fits_reason(by_name, inputs)


def first_fitting(order: tuple[str, ...], by_name: Mapping[str, OptionPlan], device_memory: int,
                  inputs: PlanInputs) -> str | None:
    """The option :func:`recommend` would choose with ``device_memory`` bytes per device."""
    for name in order:
        option = by_name[name]
        host_ok = inputs.host_memory is None or option.host_per_node <= inputs.host_memory
        if option.device_total <= device_memory and host_ok:
            return name
    return None


def reason_for(chosen: OptionPlan, by_name: Mapping[str, OptionPlan], inputs: PlanInputs) -> str:
    need, have = human(chosen.device_total), human(inputs.device_memory)
    zero2 = by_name["zero2"]
    if chosen.name == "zero2":
        return (f"ZeRO-2 fits ({need} of {have} per device): DDP's communication volume with optimizer "
                "states and gradients sharded, the usual first choice")
    if chosen.name == "ddp" and inputs.world_size == 1:
        return f"one device, nothing to shard: plain DeepSpeed (ZeRO-0) fits ({need} of {have})"
    if chosen.name == "ddp":
        return (f"ZeRO-2 needs {human(zero2.device_total)} of which {human(zero2.buffers)} are reduce "
                "buckets; "
                f"DDP fits ({need} of {have}); or shrink reduce_bucket_size and use ZeRO-2")
    if chosen.name == "zero3":
        return (f"ZeRO-2 needs {human(zero2.device_total)} per device (the replicated {inputs.precision} "
                f"parameters alone are {human(zero2.params)}) > {have}; ZeRO-3 shards them too and fits "
                f"({need}) at 1.5x DDP's communication")
    where = "NVMe" if "nvme" in chosen.name else "host RAM"
    return (f"no GPU-only option fits in {have} (ZeRO-3 needs {human(by_name['zero3'].device_total)}); "
            f"{chosen.option.label} fits ({need} per device, {human(chosen.host_per_node)} host RAM per "
            "node) "
            f"by moving state to {where}, at the cost of PCIe traffic")


def nothing_fits_reason(by_name: Mapping[str, OptionPlan], inputs: PlanInputs) -> str:
    smallest = min(by_name.values(), key=lambda o: o.device_total)
    return (f"nothing fits in {human(inputs.device_memory)} per device (the smallest, "
            f"{smallest.option.label}, "
            f"needs {human(smallest.device_total)} and {human(smallest.host_per_node)} host RAM per node): "
            "add devices, lower the micro-batch, turn on activation checkpointing or give more host memory")


def bucket_warnings(options: tuple[OptionPlan, ...], inputs: PlanInputs, hidden_size: Any) -> tuple[str, ...]:
    """One line per GPU-only ZeRO option whose reduce buckets outweigh its model states
    (a small model under DeepSpeed's 5e8-element default), with the size to set instead."""
    warnings = []
    suggestion = suggested_bucket(inputs, hidden_size)
    for option in options:
        gpu_only = option.option.offload_optimizer == "none" and option.option.stage > 0
        small = suggestion < inputs.buckets.reduce_bucket_size
        if not gpu_only or not small or option.buffers <= option.model_states:
            continue
        warnings.append(
            f"{option.option.label}: reduce buckets take {human(option.buffers)} per device "
            f"({inputs.buckets.reduce_buffers(option.option.stage)} x "
            f"reduce_bucket_size {inputs.buckets.reduce_bucket_size:.3g} x {inputs.bucket_bytes} B), "
            "more than "
            f"the model states ({human(option.model_states)}); for a model this small set "
            f"zero_optimization.reduce_bucket_size to {suggestion}"
            + (" and stage3_prefetch_bucket_size to the same" if option.option.stage == 3 else ""))
    return tuple(warnings)


def suggested_bucket(inputs: PlanInputs, hidden_size: Any) -> int:
    """hidden^2 when the hidden size is known (Hugging Face's ``"auto"``), else a tenth of
    the trainable parameters but no less than the largest layer; never above the current."""
    if is_int(hidden_size) and hidden_size > 0:
        size = hidden_size * hidden_size
    else:
        size = max(inputs.params.trainable // 10, inputs.params.largest_layer)
    return max(1, min(size, inputs.buckets.reduce_bucket_size))

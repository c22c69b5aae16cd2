"""A memory planner that picks the ZeRO stage before anything is allocated.

:func:`plan` prices every option (DDP baseline, ZeRO-1/2/3, CPU optimizer offload, CPU
parameter offload, NVMe) per device and per node, says which fit, and recommends one in
the order of the usual guidance: ZeRO-2 first, ZeRO-3 when the replicated parameters do
not fit, offload last. :func:`preflight` runs the same plan for a real model and config
and returns a warning when the config will not fit the memory this process can see.

The planner's parts, each in its module:

- :mod:`~zeroloop.memory.request`: the arguments as a typed request, every problem
  collected and raised at once.
- :mod:`~zeroloop.memory.model`: the cost model (the ZeRO paper's formulas and what
  DeepSpeed 0.19 allocates besides), pure functions of the validated inputs.
- :mod:`~zeroloop.memory.advice`: the recommendation, its reason and bucket warnings.
- :mod:`~zeroloop.memory.probes`: the memory this process can see (CUDA, /proc).
- :mod:`~zeroloop.memory.render`: the table ``zeroloop plan`` prints.

Units: bytes everywhere; GB = 1e9 bytes and GiB = 2**30 bytes when printed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..runtime import local_world_size
from ..sizes import human
from .advice import bucket_warnings, recommend
from .model import (HOST_BUFFER_FACTOR, OPTIONS, OPTIONS_BY_NAME, OptionPlan, ParamCount, PlanInputs,
                    estimate_activations, price_option)
from .probes import visible_device_memory
from .render import format_table
from .request import PlanRequest, count_parameters



@dataclass(frozen=True)
class Plan:
    """What :func:`plan` returns.

    Attributes:
        inputs: the validated inputs.
        options: one :class:`OptionPlan` per option, in :data:`OPTIONS` order.
        recommended: the name of the option to use, or None if nothing fits.
        reason: one line saying why.
        warnings: communication buffers that dominate, and what to set instead.
        activations: ``(without, with)`` activation checkpointing, bytes per device, or None.
    """

    inputs: PlanInputs
    options: tuple[OptionPlan, ...]
    recommended: str | None
    reason: str
    warnings: tuple[str, ...] = ()
    activations: tuple[int, int] | None = None

    def __getitem__(self, name: str) -> OptionPlan:
        for option in self.options:
            if option.name == name:
                return option
        raise KeyError(f"no option {name!r}; options are {', '.join(OPTIONS_BY_NAME)}")

    def to_dict(self) -> dict[str, Any]:
        inputs = asdict(self.inputs)
        inputs.update(nodes=self.inputs.nodes, params=asdict(self.inputs.params))
        return {"units": "bytes", "inputs": inputs, "recommended": self.recommended, "reason": self.reason,
                "warnings": list(self.warnings),
                "activations": dict(zip(("without_checkpointing", "with_checkpointing"), self.activations))
                if self.activations else None,
                "options": [option.to_dict() for option in self.options]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """The plan as a fixed-width table for a terminal."""
        return format_table(self)


def plan(
    model: Any = None,
    *,
    params: float | None = None,
    world_size: int = 1,
    devices_per_node: int | None = None,
    device_memory: float | str | None = None,
    host_memory: float | str | None = None,
    precision: str | None = None,
    optimizer: str | float = "adam",
    micro_batch: int | None = None,
    seq_len: int | None = None,
    hidden_size: int | None = None,
    layers: int | None = None,
    activation_checkpointing: bool = False,
    largest_layer: int | None = None,
    trainable_params: int | None = None,
    ds_config: Mapping[str, Any] | None = None,
    zero_init: bool = True,
    host_buffer_factor: float = HOST_BUFFER_FACTOR,
) -> Plan:
    """Price every ZeRO option for a model (or a parameter count) and recommend one.

    Args:
        model: an ``nn.Module`` to count (tied parameters once, frozen ones included).
        params: the parameter count instead of a model, e.g. ``7e9``.
        world_size: data-parallel ranks in all (the paper's N).
        devices_per_node: ranks per node (default: all on one node).
        device_memory: per device, bytes or a size such as ``"24GB"`` / ``"80GiB"``.
        host_memory: host RAM per node, bytes or a size; None leaves it unchecked.
        precision: "fp32", "bf16", "fp16" or "autocast" (DeepSpeed's torch_autocast: fp32
            weights and gradients); default: the config's, else bf16.
        optimizer: "adam", "adamw", "lamb", "adagrad", "lion", "sgd", "sgd-nomomentum",
            or the paper's K itself (bytes per trainable parameter) as a number.
        micro_batch, seq_len, hidden_size, layers: all four for an activation estimate
            (a transformer's; ``hidden_size`` also sizes ``"auto"`` buckets).
        activation_checkpointing: count checkpointed activations in the verdict.
        largest_layer: parameters of the largest layer, when ``params`` is given
            (default: 0, which leaves ZeRO-3's gathered layers out).
        trainable_params: with ``params``, how many of them train (default all).
        ds_config: a DeepSpeed config: bucket sizes, precision, and the option it selects.
        zero_init: ZeRO-3 builds the model under ``deepspeed.zero.Init``.
        host_buffer_factor: host-memory margin (DeepSpeed's estimators use 1.5).

    Returns:
        A :class:`Plan`.

    Raises:
        ConfigError: every bad argument, each named with its fix.
    """
    inputs = PlanRequest(model=model, params=params, world_size=world_size, devices_per_node=devices_per_node,
                         device_memory=device_memory, host_memory=host_memory, precision=precision,
                         optimizer=optimizer, micro_batch=micro_batch, seq_len=seq_len,
                         hidden_size=hidden_size, layers=layers,
                         activation_checkpointing=activation_checkpointing, largest_layer=largest_layer,
                         trainable_params=trainable_params, ds_config=ds_config, zero_init=zero_init,
                         host_buffer_factor=host_buffer_factor).inputs()
    activations = estimate_activations(inputs)
    options = tuple(price_option(option, inputs, activations) for option in OPTIONS)
    recommended, reason = recommend(options, inputs)
    warnings = bucket_warnings(options, inputs, hidden_size)
    return Plan(inputs, options, recommended, reason, warnings, activations)


def preflight(model, ds_config: Mapping[str, Any], world_size: int, device_memory: float | str | None = None
              ) -> str | None:
    """A warning when ``ds_config`` will not fit the memory this process can see, else None.

    Call it before ``deepspeed.initialize`` with the resolved config.

    Args:
        model: the ``nn.Module`` about to be trained.
        ds_config: the resolved DeepSpeed config (stage, offload, buckets, precision).
        world_size: data-parallel ranks.
        device_memory: per device; default: free GPU memory plus what this process holds
            (``torch.cuda.mem_get_info``), or on a CPU the available RAM shared by the
            local ranks.

    Returns:
        One line naming the option that would fit, or None when the config fits.
    """
    local = max(1, local_world_size())  # from the launcher's environment
    memory = device_memory if device_memory is not None else visible_device_memory(local)
    result = plan(model, world_size=world_size, devices_per_node=local if world_size % local == 0 else None,
                  device_memory=memory, ds_config=ds_config)
    current = result[result.inputs.current]
    if current.fits:
        return None
    better = (f"{OPTIONS_BY_NAME[result.recommended].label} would "
              f"({human(result[result.recommended].device_total)}; zero_optimization: "
              f"{json.dumps(OPTIONS_BY_NAME[result.recommended].zero_config())})"
              if result.recommended else result.reason)
    return (f"memory pre-flight: {current.option.label} needs about {human(current.device_total)} per device "
            f"but {human(result.inputs.device_memory)} is available; {better}")


__all__ = ["OptionPlan", "ParamCount", "Plan", "PlanInputs", "PlanRequest", "count_parameters", "plan",
           "preflight", "visible_device_memory"]

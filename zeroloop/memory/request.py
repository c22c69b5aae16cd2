"""What :func:`zeroloop.plan` is asked: its arguments as a typed :class:`PlanRequest`,
checked all at once (:meth:`PlanRequest.problems`) and turned into the cost model's
validated :class:`~zeroloop.memory.model.PlanInputs`.

A DeepSpeed config, when given, supplies the bucket sizes, the precision and the option it
selects; a model is counted the way DeepSpeed's estimators count it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

from ..config import (DEFAULT_BUCKETS, autocast_on, is_int, is_number, precision_of, resolve_buckets,
                      zero_stage_of)
from ..errors import ConfigError
from ..sizes import parse_size
from .model import FP32_MASTER_BYTES, OPTIONS, PRECISION_BYTES, Buckets, ParamCount, PlanInputs

# Bytes per trainable parameter of optimizer state, the fp32 master copy excluded
# (mixed precision adds 4 for it): Adam's momentum and variance are 8.
OPTIMIZER_STATE_BYTES = {"adam": 8, "adamw": 8, "lamb": 8, "adagrad": 4, "lion": 4,
                         "sgd": 4, "sgd-nomomentum": 0}

# zero_optimization key -> Buckets field.
BUCKET_KEYS = {
    "reduce_bucket_size": "reduce_bucket_size",
    "allgather_bucket_size": "allgather_bucket_size",
    "overlap_comm": "overlap_comm",
    "contiguous_gradients": "contiguous_gradients",
    "stage3_prefetch_bucket_size": "prefetch_bucket_size",
    "stage3_max_live_parameters": "max_live_parameters",
    "stage3_param_persistence_threshold": "param_persistence_threshold",
    "sub_group_size": "sub_group_size",
}


@dataclass(frozen=True)
class PlanRequest:
    """:func:`zeroloop.plan`'s arguments as given (see it for each one's meaning and units).

    :meth:`problems` lists everything wrong with them; :meth:`inputs` raises them all at
    once or returns the validated :class:`PlanInputs`.
    """

    model: Any
    params: float | None
    world_size: int
    devices_per_node: int | None
    device_memory: float | str | None
    host_memory: float | str | None
    precision: str | None
    optimizer: str | float
    micro_batch: int | None
    seq_len: int | None
    hidden_size: int | None
    layers: int | None
    activation_checkpointing: bool
    largest_layer: int | None
    trainable_params: int | None
    ds_config: Mapping[str, Any] | None
    zero_init: bool
    host_buffer_factor: float

    def problems(self) -> list[str]:
        """Every problem with the arguments, each naming the argument and its fix; [] if none."""
        return self._check()[1]

    def inputs(self) -> PlanInputs:
        """The validated inputs of the cost model.

        Raises:
            ConfigError: listing every problem (``subject="zeroloop.plan arguments"``).
        """
        inputs, problems = self._check()
        if problems:
            raise ConfigError(problems, subject="zeroloop.plan arguments")
        return inputs

    def _check(self) -> tuple[PlanInputs | None, list[str]]:
        """The inputs (None when there are problems) and the problems, in one pass (a model
        is counted once)."""
        problems: list[str] = []
        cfg = check_ds_config(self.ds_config, self.hidden_size, problems)
        buckets = buckets_from_config(cfg, problems)
        counts = self._counts(buckets.param_persistence_threshold, problems)
        world_size, per_node = check_topology(self.world_size, self.devices_per_node, problems)
        precision = self.precision or (planned_precision(cfg) if self.ds_config is not None else "bf16")
        if precision not in PRECISION_BYTES:
            problems.append(f"precision: must be one of {', '.join(PRECISION_BYTES)}, got {precision!r}")
        device_memory = check_size("device_memory", self.device_memory, problems)
        host_memory = check_size("host_memory", self.host_memory, problems)
        activations = self._activations(problems)
        check_optimizer(self.optimizer, problems)
        factor = self.host_buffer_factor
        if not is_number(factor) or factor < 1:
            problems.append(f"host_buffer_factor: must be a number >= 1 (1.5 is DeepSpeed's), got {factor!r}")
        if problems:
            return None, problems
        name, k = optimizer_k(self.optimizer, precision)
        return PlanInputs(params=counts, world_size=world_size, devices_per_node=per_node,
                          device_memory=device_memory, host_memory=host_memory, precision=precision,
                          optimizer=name, k=k, buckets=buckets, activations=activations,
                          activation_checkpointing=bool(self.activation_checkpointing),
                          zero_init=bool(self.zero_init), host_buffer_factor=factor,
                          current=option_of_config(cfg) if self.ds_config is not None else None), []

    def _counts(self, threshold: int, problems: list[str]) -> ParamCount:
        """The :class:`ParamCount` from the model or from ``params`` (exactly one)."""
        model, params = self.model, self.params
        if (model is None) == (params is None):
            problems.append("model / params: give exactly one: an nn.Module to count, or params=7e9")
            return ParamCount(1, 1, 0)
        if model is not None:
            if not hasattr(model, "parameters"):
                problems.append(f"model: must be a torch.nn.Module, got {type(model).__name__}; "
                                "or pass params=")
                return ParamCount(1, 1, 0)
            counted = count_parameters(model, threshold)
            if counted.total == 0:
                problems.append("model: has no parameters; pass a model with parameters or params=")
            return counted
        total = check_positive_int("params", params, problems)
        trainable = self.trainable_params
        if trainable is None:
            trainable = total
        else:
            trainable = check_positive_int("trainable_params", trainable, problems, 0)
        largest = self.largest_layer or 0
        largest = check_positive_int("largest_layer", largest, problems, 0)
        if total and trainable > total:
            problems.append(f"trainable_params: {trainable} is more than params ({total})")
        if total and largest > total:
            problems.append(f"largest_layer: {largest} is more than params ({total})")
        return ParamCount(total or 1, trainable, largest)

    def _activations(self, problems: list[str]) -> tuple[int, int, int, int] | None:
        """``(micro_batch, seq_len, hidden_size, layers)``: all four or none (``hidden_size``
        alone only sizes ``"auto"`` buckets)."""
        sizes = {"micro_batch": self.micro_batch, "seq_len": self.seq_len, "hidden_size": self.hidden_size,
                 "layers": self.layers}
        given = [name for name, value in sizes.items() if value is not None]
        if not given:
            return None
        if len(given) < len(sizes) and given != ["hidden_size"]:
            missing = [name for name, value in sizes.items() if value is None]
            problems.append(f"{', '.join(missing)}: the activation estimate needs all of micro_batch, "
                            f"seq_len, hidden_size and layers; give {' and '.join(missing)} too, "
                            "or none of them")
            return None
        if given == ["hidden_size"]:
            check_positive_int("hidden_size", self.hidden_size, problems)
            return None
        values = tuple(check_positive_int(name, value, problems) for name, value in sizes.items())
        return values if all(values) else None


def check_ds_config(ds_config: Any, hidden_size: Any, problems: list[str]) -> dict:
    """A private copy of the config with bucket ``"auto"`` values resolved."""
    if ds_config is None:
        return {}
    if not isinstance(ds_config, Mapping):
        problems.append(f"ds_config: must be a DeepSpeed config dict, got {type(ds_config).__name__}")
        return {}
    cfg = copy.deepcopy(dict(ds_config))
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, Mapping):
        problems.append("ds_config.zero_optimization: must be a JSON object")
        cfg["zero_optimization"] = {}
        return cfg
    stage = zero.get("stage", 0)
    if not is_int(stage) or not 0 <= stage <= 3:
        problems.append(f"ds_config.zero_optimization.stage: must be 0, 1, 2 or 3, got {stage!r}")
        cfg["zero_optimization"]["stage"] = 0
    resolve_buckets(cfg, hidden_size if is_int(hidden_size) else None)
    return cfg


def buckets_from_config(cfg: Mapping, problems: list[str]) -> Buckets:
    """The :class:`Buckets` a config sets; DeepSpeed's defaults for the rest."""
    zero = cfg.get("zero_optimization", {})
    values = {}
    for key, name in BUCKET_KEYS.items():
        if key not in zero:
            continue
        value = zero[key]
        if name in ("overlap_comm", "contiguous_gradients"):
            if not isinstance(value, bool):
                problems.append(f"ds_config.zero_optimization.{key}: must be true or false, got {value!r}")
                continue
        elif value == "auto" and key == "allgather_bucket_size":
            continue
        elif not is_number(value) or value < 0:
            problems.append(f"ds_config.zero_optimization.{key}: must be a number of elements >= 0, "
                            f"got {value!r}")
            continue
        else:
            value = int(value)
        values[name] = value
    return Buckets(**values)


def planned_precision(cfg: Mapping) -> str:
    """The planner's precision for a config: ``"autocast"`` under DeepSpeed's torch_autocast,
    else its fp32/bf16/fp16."""
    return "autocast" if autocast_on(cfg) else precision_of(cfg)


def option_of_config(cfg: Mapping) -> str:
    """The name of the option a DeepSpeed config selects."""
    zero = cfg.get("zero_optimization", {})
    stage = zero_stage_of(cfg)
    devices = [(zero.get(key) or {}).get("device", "none") for key in ("offload_optimizer", "offload_param")]
    for option in OPTIONS:
        if (option.stage, option.offload_optimizer, option.offload_param) == (stage, *devices):
            return option.name
    # Combinations the table does not list map to the nearest one that it does.
    if "nvme" in devices:
        return "zero3-nvme"
    if stage == 3:
        return "zero3-offload-params" if devices[1] != "none" else "zero3-offload"
    return "zero2-offload" if devices[0] != "none" else OPTIONS[stage].name


def count_parameters(model, persistence_threshold: int = DEFAULT_BUCKETS["stage3_param_persistence_threshold"]
                     ) -> ParamCount:
    """Count a model's parameters the way DeepSpeed's estimators do.

    Tied parameters (one storage, several modules) are counted once, by storage address
    (by identity on the meta device, where every address is 0).

    Args:
        model: an ``nn.Module``.
        persistence_threshold: ZeRO-3's ``stage3_param_persistence_threshold``, elements.

    Returns:
        A :class:`ParamCount`.
    """
    unique = {}
    for p in model.parameters():
        key = id(p) if p.device.type == "meta" else (p.data_ptr(), p.numel())
        unique[key] = p
    params = list(unique.values())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return ParamCount(total=sum(p.numel() for p in params),
                      trainable=sum(p.numel() for p in params if p.requires_grad),
                      largest_layer=largest,
                      persistent=sum(p.numel() for p in params if p.numel() <= persistence_threshold))


def check_topology(world_size: Any, per_node: Any, problems: list[str]) -> tuple[int, int]:
    world_size = check_positive_int("world_size", world_size, problems) or 1
    if per_node is None:
        return world_size, world_size
    per_node = check_positive_int("devices_per_node", per_node, problems) or 1
    if world_size % per_node:
        problems.append(f"devices_per_node: world_size ({world_size}) must be a multiple of it, got "
                        f"{per_node}; world_size is devices_per_node x nodes")
        return world_size, 1
    return world_size, per_node


def check_positive_int(name: str, value: Any, problems: list[str], minimum: int = 1) -> int:
    """``value`` as an int if it is a whole number >= minimum (7e9 is fine), else 0 and a problem."""
    if is_number(value) and float(value).is_integer() and value >= minimum:
        return int(value)
    problems.append(f"{name}: must be a whole number >= {minimum}, got {value!r}")
    return 0


def check_size(name: str, value: Any, problems: list[str]) -> int | None:
    if value is None:
        return None
    try:
        size = parse_size(value)
    except ValueError as e:
        problems.append(f"{name}: {e}")
        return None
    if size <= 0:
        problems.append(f"{name}: must be positive, got {value!r}")
        return None
    return size


def optimizer_k(optimizer: Any, precision: str) -> tuple[str, float]:
    """The optimizer's name and the paper's K: state bytes, plus the fp32 master in mixed
    precision (under autocast the weights are the fp32 master)."""
    if is_number(optimizer):
        return f"K={optimizer:g}", float(optimizer)
    name = str(optimizer).lower()
    master = FP32_MASTER_BYTES if precision in ("bf16", "fp16") else 0
    return name, float(OPTIMIZER_STATE_BYTES[name] + master)


def check_optimizer(optimizer: Any, problems: list[str]) -> None:
    if is_number(optimizer):
        if optimizer < 0:
            problems.append(f"optimizer: K (bytes per parameter) must be >= 0, got {optimizer}")
    elif str(optimizer).lower() not in OPTIMIZER_STATE_BYTES:
        problems.append(f"optimizer: unknown {optimizer!r}; use one of {', '.join(OPTIMIZER_STATE_BYTES)} "
                        "or the bytes per parameter (the paper's K, 12 for mixed-precision Adam)")

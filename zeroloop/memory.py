"""A memory planner that picks the ZeRO stage before anything is allocated.

:func:`plan` prices every option (DDP baseline, ZeRO-1/2/3, CPU optimizer offload, CPU
parameter offload, NVMe) per device and per node, says which fit, and recommends one in
the order of the usual guidance: ZeRO-2 first, ZeRO-3 when the replicated parameters do
not fit, offload last. :func:`preflight` runs the same plan for a real model and config
and returns a warning when the config will not fit the memory this process can see.

The model-state formulas are the ZeRO paper's (Rajbhandari et al. 2020, section 3), with
``P`` bytes per parameter for the weights, ``G`` for the gradients and ``K`` for the
optimizer (``K = 12`` for mixed-precision Adam: fp32 master, momentum, variance)::

    DDP     (P + G + K) * psi            ZeRO-2  P * psi + (G + K) * psi / N
    ZeRO-1  (P + G) * psi + K * psi / N  ZeRO-3  (P + G + K) * psi / N

On top of them the plan adds what DeepSpeed 0.19 allocates besides: the fp32 gradient
partition the mixed-precision step builds, the gathered layers of ZeRO-3, the gradient
communication buckets, and (when sizes are given) activations. docs/memory-planner.md
compares every term with DeepSpeed's own estimators.

Units: bytes everywhere; GB = 1e9 bytes and GiB = 2**30 bytes when printed.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from .config import DEFAULT_BUCKETS, autocast_on, is_int, is_number, precision_of, resolve_buckets, zero_stage_of
from .errors import ConfigError
from .runtime import local_world_size
from .sizes import human, parse_size

# Bytes per weight and per gradient. "autocast" is DeepSpeed's torch_autocast mode: fp32
# weights, gradients and optimizer, the forward in 16-bit (zeroloop.autocast).
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "autocast": 4}
# Activation bytes against all-16-bit activations. Autocast keeps the residual stream and
# the norms' inputs in fp32: 48 bytes per token per hidden unit per layer of the bundled
# GPT against 32 with bf16 weights and 64 in fp32 (saved tensors counted on a CPU).
ACTIVATION_FACTOR = {"fp32": 2.0, "bf16": 1.0, "fp16": 1.0, "autocast": 1.5}
# Bytes per trainable parameter of optimizer state, the fp32 master copy excluded
# (mixed precision adds 4 for it): Adam's momentum and variance are 8.
OPTIMIZER_STATE_BYTES = {"adam": 8, "adamw": 8, "lamb": 8, "adagrad": 4, "lion": 4,
                         "sgd": 4, "sgd-nomomentum": 0}
FP32_MASTER_BYTES = 4
# DeepSpeed 0.19's zero_optimization defaults for the keys the plan reads.
DEFAULT_SUB_GROUP_SIZE = 1_000_000_000
DEFAULT_ALLGATHER_BUCKET = 500_000_000
DEFAULT_MAX_LIVE_PARAMETERS = 1_000_000_000
# DeepSpeed's estimators multiply host memory by 1.5 for buffers and fragmentation.
HOST_BUFFER_FACTOR = 1.5
# Per-layer activation bytes of a transformer layer, in units of seq * batch * hidden, with
# 16-bit activations and fused (flash) attention: Korthikanti et al. 2022, table 2, less
# the 5*a*s/h attention-score term that fused attention never stores.
ACTIVATION_UNITS_PER_LAYER = 34
CHECKPOINT_UNITS_PER_LAYER = 2  # the saved 16-bit layer input
# DeepSpeed's NVMe swap defaults: offload_param buffer_count x buffer_size (elements) and
# the optimizer swapper's pinned buffers.
NVME_PARAM_BUFFERS = 5 * 100_000_000
NVME_OPTIMIZER_BUFFERS = 4


# --- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCount:
    """What a model holds, shared (tied) parameters counted once.

    Attributes:
        total: every parameter, trainable and frozen.
        trainable: those with ``requires_grad`` (they alone get gradients and optimizer state).
        largest_layer: the most parameters any one module owns directly (DeepSpeed's
            definition: the unit ZeRO-3 gathers at once).
        persistent: parameters at or under ZeRO-3's persistence threshold, which ZeRO-3
            keeps whole on every rank (biases, norms).
    """

    total: int
    trainable: int
    largest_layer: int
    persistent: int = 0

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


@dataclass(frozen=True)
class Buckets:
    """The ``zero_optimization`` knobs that cost memory, in elements (DeepSpeed defaults).

    Attributes:
        reduce_bucket_size: gradients reduced per collective; ZeRO-1/2/3 allocate buffers
            of exactly this size.
        allgather_bucket_size: parameters gathered per collective after the ZeRO-1/2 step;
            DeepSpeed 0.19 gathers into views of its flat 16-bit buffer, so it costs none.
        overlap_comm: a second reduce buffer for ZeRO-1/2 (None: DeepSpeed's default, on
            for ZeRO-3 only).
        contiguous_gradients: reduce buffers are preallocated (DeepSpeed's default).
        prefetch_bucket_size: ZeRO-3 parameters gathered ahead of use.
        max_live_parameters: ZeRO-3's cap on gathered parameters.
        param_persistence_threshold: ZeRO-3 keeps parameters this small unpartitioned.
        sub_group_size: ZeRO-3 steps the optimizer this many elements at a time.
    """

    reduce_bucket_size: int = DEFAULT_BUCKETS["reduce_bucket_size"]
    allgather_bucket_size: int = DEFAULT_ALLGATHER_BUCKET
    overlap_comm: bool | None = None
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = DEFAULT_BUCKETS["stage3_prefetch_bucket_size"]
    max_live_parameters: int = DEFAULT_MAX_LIVE_PARAMETERS
    param_persistence_threshold: int = DEFAULT_BUCKETS["stage3_param_persistence_threshold"]
    sub_group_size: int = DEFAULT_SUB_GROUP_SIZE

    def reduce_buffers(self, stage: int) -> int:
        """How many reduce buffers ``stage`` allocates (0 without contiguous gradients)."""
        if stage == 0 or not self.contiguous_gradients:
            return 0
        if stage == 3:
            return 1
        return 2 if self.overlap_comm else 1


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
class PlanInputs:
    """Everything :func:`plan` prices, validated. Build it with :func:`plan`'s arguments.

    Attributes:
        params: parameters counted once each (see :class:`ParamCount`).
        world_size: data-parallel ranks, all nodes together (the paper's N).
        devices_per_node: ranks sharing one host's memory.
        device_memory: bytes per device, or None to price without a fit verdict.
        host_memory: bytes of host RAM per node, or None to leave it unchecked.
        precision: "fp32", "bf16", "fp16" (16-bit weights, an fp32 master: mixed precision)
            or "autocast" (fp32 weights and gradients, 16-bit compute).
        optimizer: the optimizer's name, for display.
        k: optimizer bytes per trainable parameter (the paper's K).
        buckets: the communication buffer sizes.
        activations: ``(micro_batch, seq_len, hidden_size, layers)`` or None.
        activation_checkpointing: count checkpointed activations in the fit verdict.
        zero_init: ZeRO-3 models are built under ``deepspeed.zero.Init`` (never whole on
            the host), as DeepSpeed's estimator assumes by default.
        host_buffer_factor: host-memory margin, 1.5 as in DeepSpeed's estimators.
        current: the option the given DeepSpeed config selects, if one was given.
    """

    params: ParamCount
    world_size: int
    devices_per_node: int
    device_memory: int | None = None
    host_memory: int | None = None
    precision: str = "bf16"
    optimizer: str = "adam"
    k: float = 12.0
    buckets: Buckets = field(default_factory=Buckets)
    activations: tuple[int, int, int, int] | None = None
    activation_checkpointing: bool = False
    zero_init: bool = True
    host_buffer_factor: float = HOST_BUFFER_FACTOR
    current: str | None = None

    @property
    def nodes(self) -> int:
        return self.world_size // self.devices_per_node

    @property
    def param_bytes(self) -> int:
        return PRECISION_BYTES[self.precision]

    @property
    def mixed(self) -> bool:
        """16-bit weights with a separate fp32 master copy (DeepSpeed's bf16/fp16 modes)."""
        return self.precision in ("bf16", "fp16")

    @property
    def bucket_bytes(self) -> int:
        """Bytes per element of the ZeRO reduce buckets. Autocast keeps one per gradient
        dtype: bf16 for Linear/Conv weights, fp32 for the rest (DeepSpeed 0.19)."""
        return PRECISION_BYTES["bf16"] + PRECISION_BYTES["fp32"] if self.precision == "autocast" else self.param_bytes


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One way to run, as DeepSpeed's ``zero_optimization`` would be set."""

    name: str
    label: str
    stage: int
    offload_optimizer: str = "none"
    offload_param: str = "none"

    def zero_config(self) -> dict:
        """The ``zero_optimization`` section that selects this option."""
        section: dict[str, Any] = {"stage": self.stage}
        devices = (("offload_optimizer", self.offload_optimizer), ("offload_param", self.offload_param))
        for key, device in devices:
            if device == "cpu":
                section[key] = {"device": "cpu"}
            elif device == "nvme":
                section[key] = {"device": "nvme", "nvme_path": "/local_nvme"}
        return section


OPTIONS = (
    Option("ddp", "DDP baseline (ZeRO-0)", 0),
    Option("zero1", "ZeRO-1 (Pos)", 1),
    Option("zero2", "ZeRO-2 (Pos+g)", 2),
    Option("zero3", "ZeRO-3 (Pos+g+p)", 3),
    Option("zero2-offload", "ZeRO-2 + CPU optimizer", 2, offload_optimizer="cpu"),
    Option("zero3-offload", "ZeRO-3 + CPU optimizer", 3, offload_optimizer="cpu"),
    Option("zero3-offload-params", "ZeRO-3 + CPU optim+params", 3, "cpu", "cpu"),
    Option("zero3-nvme", "ZeRO-3 + NVMe optim+params", 3, "nvme", "nvme"),
)
OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}
# The usual guidance (docs/memory-planner.md): ZeRO-2 has DDP's communication volume and
# less memory, so it comes first; DDP only wins when buckets dominate a small model;
# ZeRO-3 costs 1.5x the communication; offload costs PCIe traffic, NVMe the most.
PREFERENCE = ("zero2", "ddp", "zero3", "zero2-offload", "zero3-offload", "zero3-offload-params", "zero3-nvme")
# On one device there is nothing to shard: DDP, then ZeRO-Offload.
# Device memory of common accelerators (16 GB V100/T4, 24 GB A10/L4/RTX 4090, 40 and 80 GB
# A100/H100), for a recommendation per size when none is given.
COMMON_DEVICE_SIZES = (16 * 10**9, 24 * 10**9, 40 * 10**9, 80 * 10**9)
PREFERENCE_ONE_DEVICE = ("ddp", "zero2-offload", "zero3-offload", "zero3-offload-params", "zero3-nvme")


@dataclass(frozen=True)
class OptionPlan:
    """The price of one option. Bytes per device unless the name says per node.

    Attributes:
        params, grads, optimizer: the paper's model states on the device.
        model_states: their sum (the ZeRO paper's Figure 1 quantity).
        fp32_grads: the fp32 gradient copy the mixed-precision step builds (DeepSpeed's 18
            bytes/param against the paper's 16 comes from it).
        live_params: ZeRO-3's gathered layers, prefetch and persistent small parameters.
        buffers: gradient communication buffers as allocated (what a GPU reserves).
        buffers_touched: the part a lazily paged CPU allocator commits (ZeRO-1/2: the
            min(bucket, trainable parameters) elements gradients are written into).
        activations: activation memory, checkpointed or not as the inputs say.
        device_total: everything above: the verdict compares it with the device memory.
        host_per_node: host RAM per node (model load, offloaded state, pinned buffers).
        nvme_per_node: NVMe bytes per node.
        fits: device (and host, when known) within memory; None without device memory.
        deepspeed_device, deepspeed_host: DeepSpeed's estimator for the same option
            (per GPU, per node), None where it has none.
    """

    option: Option
    params: int
    grads: int
    optimizer: int
    fp32_grads: int
    live_params: int
    buffers: int
    buffers_touched: int
    activations: int
    host_per_node: int
    nvme_per_node: int = 0
    fits: bool | None = None
    deepspeed_device: int | None = None
    deepspeed_host: int | None = None

    @property
    def name(self) -> str:
        return self.option.name

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def deepspeed_comparable(self) -> int:
        """What DeepSpeed's estimators count on the device: model states, fp32 gradients
        and the gathered layer; not buffers or activations."""
        return self.model_states + self.fp32_grads + self.live_params

    @property
    def device_total(self) -> int:
        return self.model_states + self.fp32_grads + self.live_params + self.buffers + self.activations

    def to_dict(self) -> dict[str, Any]:
        out = {key: value for key, value in asdict(self).items() if key != "option"}
        out.update(name=self.name, label=self.option.label, zero_optimization=self.option.zero_config(),
                   model_states=self.model_states, deepspeed_comparable=self.deepspeed_comparable,
                   device_total=self.device_total)
        return out


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


# --- the planner ----------------------------------------------------------------------------


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
    inputs = validate_inputs(locals())
    activations = estimate_activations(inputs)
    options = tuple(price_option(option, inputs, activations) for option in OPTIONS)
    recommended, reason = recommend(options, inputs)
    warnings = bucket_warnings(options, inputs, hidden_size)
    return Plan(inputs, options, recommended, reason, warnings, activations)


def validate_inputs(args: dict[str, Any]) -> PlanInputs:
    """Check :func:`plan`'s arguments, all of them, and build the :class:`PlanInputs`.

    Raises:
        ConfigError: listing every problem (``subject="zeroloop.plan arguments"``).
    """
    problems: list[str] = []
    cfg = check_ds_config(args["ds_config"], args["hidden_size"], problems)
    buckets = buckets_from_config(cfg, problems)
    counts = check_counts(args, buckets.param_persistence_threshold, problems)
    world_size, per_node = check_topology(args["world_size"], args["devices_per_node"], problems)
    precision = args["precision"] or (planned_precision(cfg) if args["ds_config"] is not None else "bf16")
    if precision not in PRECISION_BYTES:
        problems.append(f"precision: must be one of {', '.join(PRECISION_BYTES)}, got {precision!r}")
    device_memory = check_size("device_memory", args["device_memory"], problems)
    host_memory = check_size("host_memory", args["host_memory"], problems)
    activations = check_activations(args, problems)
    check_optimizer(args["optimizer"], problems)
    factor = args["host_buffer_factor"]
    if not is_number(factor) or factor < 1:
        problems.append(f"host_buffer_factor: must be a number >= 1 (1.5 is DeepSpeed's), got {factor!r}")
    if problems:
        raise ConfigError(problems, subject="zeroloop.plan arguments")
    name, k = optimizer_k(args["optimizer"], precision)
    return PlanInputs(params=counts, world_size=world_size, devices_per_node=per_node,
                      device_memory=device_memory, host_memory=host_memory, precision=precision,
                      optimizer=name, k=k, buckets=buckets, activations=activations,
                      activation_checkpointing=bool(args["activation_checkpointing"]),
                      zero_init=bool(args["zero_init"]), host_buffer_factor=factor,
                      current=option_of_config(cfg) if args["ds_config"] is not None else None)


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


def check_counts(args: Mapping[str, Any], threshold: int, problems: list[str]) -> ParamCount:
    """The :class:`ParamCount` from the model or from ``params`` (exactly one)."""
    model, params = args["model"], args["params"]
    if (model is None) == (params is None):
        problems.append("model / params: give exactly one: an nn.Module to count, or params=7e9")
        return ParamCount(1, 1, 0)
    if model is not None:
        if not hasattr(model, "parameters"):
            problems.append(f"model: must be a torch.nn.Module, got {type(model).__name__}; or pass params=")
            return ParamCount(1, 1, 0)
        counted = count_parameters(model, threshold)
        if counted.total == 0:
            problems.append("model: has no parameters; pass a model with parameters or params=")
        return counted
    total = check_positive_int("params", params, problems)
    trainable = args["trainable_params"]
    trainable = total if trainable is None else check_positive_int("trainable_params", trainable, problems, 0)
    largest = args["largest_layer"] or 0
    largest = check_positive_int("largest_layer", largest, problems, 0)
    if total and trainable > total:
        problems.append(f"trainable_params: {trainable} is more than params ({total})")
    if total and largest > total:
        problems.append(f"largest_layer: {largest} is more than params ({total})")
    return ParamCount(total or 1, trainable, largest)


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


def check_activations(args: Mapping[str, Any], problems: list[str]) -> tuple[int, int, int, int] | None:
    names = ("micro_batch", "seq_len", "hidden_size", "layers")
    given = [name for name in names if args[name] is not None]
    if not given:
        return None
    if len(given) < len(names) and given != ["hidden_size"]:
        missing = [name for name in names if args[name] is None]
        problems.append(f"{', '.join(missing)}: the activation estimate needs all of micro_batch, seq_len, "
                        f"hidden_size and layers; give {' and '.join(missing)} too, or none of them")
        return None
    if given == ["hidden_size"]:
        check_positive_int("hidden_size", args["hidden_size"], problems)
        return None
    values = tuple(check_positive_int(name, args[name], problems) for name in names)
    return values if all(values) else None


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


# --- pricing ------------------------------------------------------------------------------


def estimate_activations(inputs: PlanInputs) -> tuple[int, int] | None:
    """Transformer activation bytes per device, ``(without, with)`` full checkpointing.

    Without: 34 * s*b*h per layer (16-bit, fused attention). With: each layer keeps only
    its 16-bit input (2 * s*b*h) and one layer is recomputed whole during backward.
    fp32 activations take twice the bytes, autocast's 1.5 times (:data:`ACTIVATION_FACTOR`).
    """
    if inputs.activations is None:
        return None
    micro, seq, hidden, layers = inputs.activations
    unit = int(micro * seq * hidden * ACTIVATION_FACTOR[inputs.precision])
    without = ACTIVATION_UNITS_PER_LAYER * unit * layers
    with_ckpt = CHECKPOINT_UNITS_PER_LAYER * unit * layers + ACTIVATION_UNITS_PER_LAYER * unit
    return without, with_ckpt


def price_option(option: Option, inputs: PlanInputs, activations: tuple[int, int] | None) -> OptionPlan:
    """Bytes per device and per node for one option."""
    n, psi, trainable = inputs.world_size, inputs.params.total, inputs.params.trainable
    p = g = inputs.param_bytes
    shard = n if option.stage >= 1 else 1
    on_device = option.offload_optimizer == "none"
    priced = OptionPlan(
        option=option,
        params=0 if option.offload_param != "none" else ceil(p * psi / (n if option.stage == 3 else 1)),
        grads=ceil(g * trainable / (n if option.stage >= 2 else 1)) if on_device else 0,
        optimizer=ceil(optimizer_bytes_per_param(option, inputs) * trainable / shard) if on_device else 0,
        fp32_grads=fp32_grad_bytes(option, inputs) if on_device else 0,
        live_params=live_param_bytes(option, inputs),
        buffers=buffer_bytes(option, inputs, touched=False),
        buffers_touched=buffer_bytes(option, inputs, touched=True),
        activations=activations[1 if inputs.activation_checkpointing else 0] if activations else 0,
        host_per_node=host_bytes(option, inputs),
        nvme_per_node=nvme_bytes(option, inputs),
        **deepspeed_estimate(option, inputs),
    )
    return replace(priced, fits=fits(priced, inputs))


def optimizer_bytes_per_param(option: Option, inputs: PlanInputs) -> float:
    """K, plus 4 for ZeRO in fp32: DeepSpeed's ZeRO optimizers keep an fp32 copy of the
    rank's partition even when the model's parameters are fp32 already (measured:
    benchmarks/memory_planner.py). DDP in fp32 steps the parameters themselves."""
    if inputs.mixed or option.stage == 0 or inputs.optimizer.startswith("K="):
        return inputs.k
    return inputs.k + FP32_MASTER_BYTES


def fp32_grad_bytes(option: Option, inputs: PlanInputs) -> int:
    """The fp32 gradients a mixed-precision step holds besides the 16-bit ones.

    DeepSpeed's ZeRO-1/2 step upcasts the rank's gradient partition to fp32; its bf16/fp16
    DDP optimizers keep fp32 gradients for the whole model; ZeRO-3 upcasts one sub-group
    (``sub_group_size`` elements) at a time.
    """
    if not inputs.mixed:
        return 0
    trainable, n = inputs.params.trainable, inputs.world_size
    if option.stage == 0:
        return 4 * trainable
    if option.stage == 3:
        return 4 * min(inputs.buckets.sub_group_size, ceil(trainable / n))
    return ceil(4 * trainable / n)


def live_param_bytes(option: Option, inputs: PlanInputs) -> int:
    """ZeRO-3's gathered parameters: the largest layer and the prefetch bucket (capped by
    ``stage3_max_live_parameters``), that layer's gradients before they are reduced, and
    the small parameters it never partitions. DeepSpeed's estimator counts 4 bytes x the
    largest layer: 16-bit parameters and gradients, no prefetch."""
    if option.stage != 3:
        return 0
    b, counts = inputs.buckets, inputs.params
    gathered = min(counts.largest_layer + b.prefetch_bucket_size, b.max_live_parameters, counts.total)
    gathered = max(gathered, counts.largest_layer)  # the layer in use is whole, cap or no cap
    return inputs.param_bytes * (gathered + counts.largest_layer + counts.persistent)


def buffer_bytes(option: Option, inputs: PlanInputs, touched: bool) -> int:
    """Gradient communication buffers: ZeRO's preallocated reduce buckets, or for DDP the
    flat copy DeepSpeed's all-reduce makes of up to 5e8 gradients. ``touched``: only the
    part gradients are written into (all that a CPU commits; a GPU allocates it all)."""
    b, trainable = inputs.buckets, inputs.params.trainable
    if option.stage == 0:
        return inputs.param_bytes * min(trainable, DEFAULT_BUCKETS["reduce_bucket_size"])
    # ZeRO-1/2 allocate the bucket for each backward and write gradients into at most
    # `trainable` elements of it; ZeRO-3 keeps it for the run and commits it whole (measured).
    size = min(b.reduce_bucket_size, trainable) if touched and option.stage < 3 else b.reduce_bucket_size
    # ZeRO-1/2 reduce in the gradient dtype; fp32 runs reduce fp32.
    return b.reduce_buffers(option.stage) * size * inputs.bucket_bytes


def host_bytes(option: Option, inputs: PlanInputs) -> int:
    """Host RAM per node: the larger of loading the model and holding offloaded state.

    Without ``zero.Init`` every local rank builds the model in fp32 on the host before
    moving it (4 bytes x params each); offloaded optimizer state is the fp32 master,
    the optimizer's moments and the fp32 gradients, per rank's partition.
    """
    n, per_node, counts = inputs.world_size, inputs.devices_per_node, inputs.params
    zero3_init = option.stage == 3 and inputs.zero_init
    load = 4 * (counts.largest_layer if zero3_init else counts.total) * per_node
    offloaded = 0
    if option.offload_optimizer == "cpu":
        offloaded += (inputs.k + 4) * counts.trainable * per_node / n
    if option.offload_param == "cpu":
        offloaded += inputs.param_bytes * counts.total * per_node / n
    if option.offload_optimizer == "nvme":
        sub_group = min(inputs.buckets.sub_group_size, counts.trainable / n)
        offloaded += per_node * (inputs.param_bytes * NVME_PARAM_BUFFERS
                                 + NVME_OPTIMIZER_BUFFERS * 4 * sub_group)
    if option.offload_optimizer != "none" and not zero3_init:
        return int(max(load, offloaded) * inputs.host_buffer_factor)
    if option.offload_optimizer == "none":
        return int(load * inputs.host_buffer_factor)
    return int(offloaded * inputs.host_buffer_factor)


def nvme_bytes(option: Option, inputs: PlanInputs) -> int:
    """NVMe per node: the rank partitions of parameters and optimizer state swapped out."""
    counts, share = inputs.params, inputs.devices_per_node / inputs.world_size
    total = 0.0
    if option.offload_optimizer == "nvme":
        total += (inputs.k + 4) * counts.trainable * share
    if option.offload_param == "nvme":
        total += inputs.param_bytes * counts.total * share
    return ceil(total)


def deepspeed_estimate(option: Option, inputs: PlanInputs) -> dict[str, int | None]:
    """DeepSpeed's own estimate for the same option: ``deepspeed_device`` (per GPU) and
    ``deepspeed_host`` (per node), from the functions its ``*_all_cold`` estimators print.
    DeepSpeed has estimators for ZeRO-2 and ZeRO-3 with CPU offload only."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    counts = inputs.params
    common = dict(total_params=counts.total, num_gpus_per_node=inputs.devices_per_node,
                  num_nodes=inputs.nodes, additional_buffer_factor=inputs.host_buffer_factor)
    if option.stage == 2 and option.offload_param == "none" and option.offload_optimizer != "nvme":
        host, device = estimate_zero2_model_states_mem_needs(cpu_offload=option.offload_optimizer == "cpu",
                                                             **common)
    elif option.stage == 3 and "nvme" not in (option.offload_optimizer, option.offload_param):
        host, device, _ = estimate_zero3_model_states_mem_needs(
            largest_layer_params=counts.largest_layer, cpu_offload=option.offload_optimizer == "cpu",
            cpu_offload_params=option.offload_param == "cpu", zero_init=inputs.zero_init, **common)
    else:
        return {"deepspeed_device": None, "deepspeed_host": None}
    return {"deepspeed_device": int(device), "deepspeed_host": int(host)}


def fits(priced: OptionPlan, inputs: PlanInputs) -> bool | None:
    if inputs.device_memory is None:
        return None
    host_ok = inputs.host_memory is None or priced.host_per_node <= inputs.host_memory
    return priced.device_total <= inputs.device_memory and host_ok


# --- the recommendation -------------------------------------------------------------------


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


# --- pre-flight -----------------------------------------------------------------------------


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


def visible_device_memory(local_ranks: int) -> int:
    """Bytes this rank may use: free GPU memory plus what it already holds, or on a CPU
    the host's available RAM (``MemAvailable``) split between the local ranks."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free + torch.cuda.memory_allocated())
    return available_ram() // max(1, local_ranks)


def available_ram() -> int:
    """``MemAvailable`` from /proc/meminfo, else psutil's figure (bytes)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


# --- output ---------------------------------------------------------------------------------


TABLE_COLUMNS = (
    ("option", 28), ("params", 9), ("grads", 9), ("optim", 9), ("states", 9), ("+fp32 g", 9),
    ("+live", 9), ("+buckets", 9), ("+activ", 9), ("=device", 9), ("host/node", 10), ("fits", 5),
    ("DS device", 10), ("DS host", 10),
)


def format_table(result: Plan) -> str:
    """Fixed-width table: one row per option, the recommendation and warnings below."""
    i = result.inputs
    lines = [f"{i.params.total:,} parameters ({i.params.trainable:,} trainable, largest layer "
             f"{i.params.largest_layer:,}), {i.world_size} devices "
             f"({i.nodes} node(s) x {i.devices_per_node}), "
             f"{i.precision}, {i.optimizer} (K={i.k:g}), device memory {human(i.device_memory)}",
             "Per device unless marked; GB = 1e9 bytes, MB = 1e6 bytes (GiB = 2^30 bytes = 1.074 GB). "
             "'DS' = DeepSpeed's estimator.",
             "".join(name.ljust(width) for name, width in TABLE_COLUMNS)]
    for o in result.options:
        fit = {True: "yes", False: "no", None: "?"}[o.fits]
        cells = (o.option.label + (" *" if o.name == i.current else ""), human(o.params), human(o.grads),
                 human(o.optimizer), human(o.model_states), human(o.fp32_grads), human(o.live_params),
                 human(o.buffers), human(o.activations), human(o.device_total), human(o.host_per_node), fit,
                 human(o.deepspeed_device), human(o.deepspeed_host))
        lines.append("".join(cell.ljust(width) for cell, (_, width) in zip(cells, TABLE_COLUMNS)))
    if i.current:
        lines.append("* the option your DeepSpeed config selects")
    if result.activations:
        lines.append(f"activations per device: {human(result.activations[0])} without checkpointing, "
                     f"{human(result.activations[1])} with")
    lines.append(f"recommended: {result.recommended or 'none'}: {result.reason}")
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


# --- small helpers --------------------------------------------------------------------------


def ceil(x: float) -> int:
    return int(math.ceil(x))

"""The planner's cost model: bytes per device and per node of every ZeRO option.

The model-state formulas are the ZeRO paper's (Rajbhandari et al. 2020, section 3), with
``P`` bytes per parameter for the weights, ``G`` for the gradients and ``K`` for the
optimizer (``K = 12`` for mixed-precision Adam: fp32 master, momentum, variance)::

    DDP     (P + G + K) * psi            ZeRO-2  P * psi + (G + K) * psi / N
    ZeRO-1  (P + G) * psi + K * psi / N  ZeRO-3  (P + G + K) * psi / N

On top of them :func:`price_option` adds what DeepSpeed 0.19 allocates besides: the fp32
gradient partition the mixed-precision step builds, the gathered layers of ZeRO-3, the
gradient communication buckets, and (when sizes are given) activations. Pure functions of
a validated :class:`PlanInputs`; docs/memory-planner.md compares every term with
DeepSpeed's own estimators.

Units: bytes everywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..config import DEFAULT_BUCKETS

# Bytes per weight and per gradient. "autocast" is DeepSpeed's torch_autocast mode: fp32
# weights, gradients and optimizer, the forward in 16-bit (zeroloop.autocast).
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "autocast": 4}
# Activation bytes against all-16-bit activations. Autocast keeps the residual stream and
# the norms' inputs in fp32: 48 bytes per token per hidden unit per layer of the bundled
# GPT against 32 with bf16 weights and 64 in fp32 (saved tensors counted on a CPU).
ACTIVATION_FACTOR = {"fp32": 2.0, "bf16": 1.0, "fp16": 1.0, "autocast": 1.5}
FP32_MASTER_BYTES = 4  # the fp32 master copy of mixed precision, per trainable parameter
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


def ceil(x: float) -> int:
    return int(math.ceil(x))

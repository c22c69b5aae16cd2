"""bf16 by ``torch.autocast``: which of DeepSpeed's two bf16 modes a run gets.

DeepSpeed 0.19 trains in bf16 two ways:

- **its bf16 mode** (``"bf16": {"enabled": true}``): the module's weights and gradients
  become bf16 and the optimizer keeps an fp32 master copy; float inputs must be bf16 too
  (the loop casts them). Everything in the forward runs in bf16, norms and softmax included.
- **its torch_autocast mode** (``"torch_autocast": {"enabled": true, "dtype": "bfloat16"}``):
  weights, gradients and optimizer stay fp32 and the engine runs the forward under
  ``torch.autocast``: matrix products in bf16, norms, softmax and losses in fp32. This is
  plain PyTorch's mixed precision. Inputs stay as given. Under ZeRO 1-3 DeepSpeed reduces
  the gradients of ``nn.Linear``/``nn.Conv*`` weights in bf16 (the others in fp32) and
  ZeRO-3 gathers those weights in bf16; without ZeRO gradients are all-reduced in fp32.

When the precision is left to zeroloop (``Hyperparameters(precision="bf16")`` with no
``bf16`` section, or ``"bf16": {"enabled": "auto"}`` resolved to bf16), :func:`choose_bf16_mode`
picks the mode; a ``"bf16"`` section the user enabled, or any ``"torch_autocast"`` section,
is never changed. The rule and the measurements behind it are in docs/precision.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

from .config import AUTO, autocast_on, get_path, precision_of

TORCH_AUTOCAST = "torch_autocast"
MODES = (TORCH_AUTOCAST, "bf16")
# The section zeroloop writes. The dtype is explicit: without it DeepSpeed's autocast
# takes the device's default, float16 on CUDA.
AUTOCAST_SECTION = {"enabled": True, "dtype": "bfloat16"}
# Where autocast was measured (docs/precision.md): faster than the bf16 mode on CUDA, as
# fast on a CPU (where using it too keeps CPU unit tests on the mode GPU runs use).
AUTOCAST_DEVICES = ("cuda", "cpu")
# Config keys that only mean something in DeepSpeed's bf16 mode, or that its autocast
# refuses: a config that sets one asked for the bf16 mode.
BF16_MODE_KEYS = (("data_types", "grad_accum_dtype"), ("communication_data_type",),
                  ("zero_optimization", "zero_quantized_weights"))


@dataclass(frozen=True)
class Bf16Choice:
    """The bf16 mode chosen for a run, and why.

    Attributes:
        mode: ``"torch_autocast"`` or ``"bf16"`` (DeepSpeed's bf16 mode).
        reason: one line naming what decided it.
    """

    mode: str
    reason: str


def left_to_zeroloop(raw: Mapping[str, Any], resolved: Mapping[str, Any]) -> bool:
    """True when ``resolved`` has bf16 on because of ``"auto"`` or the loop's precision,
    not because the user's config enabled it or chose autocast.

    Args:
        raw: the config as the user wrote it (before ``"auto"`` resolution).
        resolved: the same config resolved by :func:`zeroloop.config.resolve_config`.
    """
    if resolved.get("bf16", {}).get("enabled") is not True or TORCH_AUTOCAST in raw:
        return False
    section = raw.get("bf16")
    if section is None:
        return True
    # Options beside "enabled" configure DeepSpeed's bf16 mode: the user wants that mode.
    return section.get("enabled") == AUTO and set(section) == {"enabled"}


def choose_bf16_mode(config: Mapping[str, Any], device_type: str, autocast_fits: bool | None = None) -> Bf16Choice:
    """The bf16 mode for a resolved config whose precision was left to zeroloop.

    DeepSpeed's autocast (fp32 weights, bf16 matrix products) is exact-enough wherever
    plain PyTorch's mixed precision is, and was faster than its bf16 mode on an H200 at
    ZeRO 0 and 2 (docs/precision.md); it needs fp32 weights and gradients on the device.

    Args:
        config: the resolved config (bf16 enabled).
        device_type: the accelerator's device name ("cuda", "cpu", ...).
        autocast_fits: whether the run fits the device memory with fp32 weights
            (None: unknown, taken as fitting).

    Returns:
        The :class:`Bf16Choice`.
    """
    zero = config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offloaded = [key for key in ("offload_optimizer", "offload_param")
                 if (zero.get(key) or {}).get("device", "none") != "none"]
    bf16_keys = [".".join(path) for path in BF16_MODE_KEYS if get_path(config, path) not in (None, False)]
    if device_type not in AUTOCAST_DEVICES:
        return Bf16Choice("bf16", f"DeepSpeed's autocast is not measured on {device_type}: its bf16 mode is kept")
    if stage == 3:
        return Bf16Choice("bf16", "ZeRO-3 keeps DeepSpeed's bf16 mode: it gathers bf16 weights either way, and "
                                  "fp32 partitions would double the parameter memory it exists to save")
    if offloaded:
        return Bf16Choice("bf16", f"{' and '.join(offloaded)} keeps DeepSpeed's bf16 mode: an offloaded run is "
                                  "short of device memory, and bf16 weights take half")
    if bf16_keys:
        return Bf16Choice("bf16", f"{', '.join(bf16_keys)} is set: it belongs to DeepSpeed's bf16 mode")
    if autocast_fits is False:
        return Bf16Choice("bf16", "fp32 weights and gradients would not fit the device memory; bf16 weights do")
    return Bf16Choice(TORCH_AUTOCAST, f"ZeRO-{stage} on {device_type}: fp32 weights with autocast bf16 compute, "
                                      "as plain PyTorch")


def choose_for_run(model, config: Mapping[str, Any], world_size: int) -> Bf16Choice:
    """:func:`choose_bf16_mode` for this process's accelerator and memory, the same on every rank.

    Collective when the rule would pick autocast: the ranks agree through one small
    all-reduce whether fp32 weights fit everywhere (the memory each rank sees can differ).

    Args:
        model: the model about to be trained (its parameters are counted).
        config: the resolved config (bf16 enabled).
        world_size: data-parallel ranks.
    """
    import deepspeed.comm as dist
    import torch
    from deepspeed.accelerator import get_accelerator

    device_type = get_accelerator().device_name()
    choice = choose_bf16_mode(config, device_type)
    if choice.mode != TORCH_AUTOCAST:
        return choice
    fits = torch.tensor([int(fits_device_memory(model, with_mode(config, TORCH_AUTOCAST), world_size))],
                        device=get_accelerator().current_device_name())
    if dist.is_initialized():
        dist.all_reduce(fits, op=dist.ReduceOp.MIN)
    return choose_bf16_mode(config, device_type, autocast_fits=bool(fits.item()))


def fits_device_memory(model, config: Mapping[str, Any], world_size: int) -> bool:
    """Whether ``config``'s option fits the memory this process can see, by the planner
    (model states, buffers; activations unknown here)."""
    from .memory import plan, visible_device_memory
    from .runtime import local_world_size

    local = max(1, local_world_size())
    result = plan(model, world_size=world_size, devices_per_node=local if world_size % local == 0 else None,
                  device_memory=visible_device_memory(local), ds_config=config)
    return bool(result[result.inputs.current].fits)


def with_mode(config: Mapping[str, Any], mode: str) -> dict:
    """A copy of a resolved bf16 config set to ``mode``: the ``bf16`` section swapped for
    ``torch_autocast`` (bf16), or returned as it is (``"bf16"``).

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
    out = copy.deepcopy(dict(config))
    if mode == TORCH_AUTOCAST:
        out.pop("bf16", None)
        out[TORCH_AUTOCAST] = dict(AUTOCAST_SECTION)
    return out


def bf16_for_run(model, raw: Mapping[str, Any], resolved: Mapping[str, Any],
                 world_size: int) -> tuple[Mapping[str, Any], Bf16Choice | None]:
    """The resolved config in the bf16 mode this run takes, and the choice made: when bf16
    was left to zeroloop (``"auto"`` or the loop's precision), :func:`choose_for_run` picks
    (collective when it would pick autocast); an enabled section is kept (choice None)."""
    if not left_to_zeroloop(raw, resolved):
        return resolved, None
    choice = choose_for_run(model, resolved, world_size)
    return with_mode(resolved, choice.mode), choice


def precision_mode(config: Mapping[str, Any]) -> str:
    """How a resolved config trains: ``"torch_autocast"``, ``"bf16"``, ``"fp16"`` or ``"fp32"``."""
    return TORCH_AUTOCAST if autocast_on(config) else precision_of(config)


# The section that pins each mode, for messages.
MODE_SECTIONS = {TORCH_AUTOCAST: '"torch_autocast": {"enabled": true, "dtype": "bfloat16"}',
                 "bf16": '"bf16": {"enabled": true}', "fp16": '"fp16": {"enabled": true}',
                 "fp32": 'precision="fp32" with no "bf16", "fp16" or "torch_autocast" section'}

"""DeepSpeed config loading, validation and ``"auto"`` resolution.

Everything here runs before ``deepspeed.initialize`` and needs no process group, so it is
plain logic you can test alone. Every problem found is collected and raised once as a
:class:`ConfigError` that names the key and the fix (litgpt's ``validate_args`` style).

``"auto"`` has the meaning it has in Hugging Face's DeepSpeed integration: take the value
from the loop's own arguments (:class:`Hyperparameters`) and the world size.
"""

from __future__ import annotations

import copy
import difflib
import json
import numbers
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError


AUTO = "auto"

# Top-level keys DeepSpeed 0.16-0.19 reads (runtime/config.py and the feature configs it
# builds). DeepSpeed ignores unknown keys silently; a typo such as "zero_optimisation"
# would then train without ZeRO, so zeroloop refuses them.
KNOWN_TOP_LEVEL_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "optimizer", "scheduler", "fp16", "bf16", "bfloat16", "amp", "torch_autocast",
    "gradient_clipping", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown", "dump_state",
    "memory_breakdown", "prescale_gradients", "gradient_predivide_factor",
    "gradient_allreduce_op", "communication_data_type", "seq_parallel_communication_data_type",
    "sparse_gradients", "disable_allgather", "disable_python_gc", "dataloader_drop_last",
    "activation_checkpointing", "flops_profiler", "comms_logger", "tensorboard", "wandb",
    "csv_monitor", "comet", "monitor_config", "checkpoint", "data_types", "aio", "elasticity",
    "autotuning", "pipeline", "sparse_attention", "data_efficiency", "curriculum_learning",
    "compression_training", "weight_quantization", "hybrid_engine", "nebula",
    "quantize_training", "eigenvalue", "progressive_layer_drop", "graph_harvesting",
    "use_data_before_expert_parallelism", "timers", "compile", "tensor_parallel",
    "expert_parallel", "log_level", "managed_gradient_accumulation", "zero_quantized_weights",
    "vocabulary_size", "mics_shard_size", "mics_hierarchical_params_gather",
})

PRECISIONS = ("fp32", "bf16", "fp16")
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# DeepSpeed's defaults, used for bucket "auto" values when the model's hidden size is unknown.
DEFAULT_BUCKETS = {
    "reduce_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
}


@dataclass(frozen=True)
class Hyperparameters:
    """Loop arguments that fill the config's ``"auto"`` values.

    ``None`` means "not given": an ``"auto"`` then takes the default shown (Hugging Face
    ``TrainingArguments``' default), and an explicit config value is kept. A value given
    here that contradicts an explicit config value is an error.

    Attributes:
        micro_batch_size: samples per rank per micro-step (``train_micro_batch_size_per_gpu``).
        gradient_accumulation_steps: micro-steps per optimizer step (default 1).
        lr: peak learning rate (default 5e-5).
        betas: Adam betas (default (0.9, 0.999)).
        eps: Adam epsilon (default 1e-8).
        weight_decay: decoupled weight decay (default 0.0).
        max_grad_norm: ``gradient_clipping`` (default 1.0; 0 turns clipping off).
        warmup_steps: scheduler warm-up in optimizer steps (default 0).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (default fp32).
    """

    micro_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    lr: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    warmup_steps: int | None = None
    precision: str | None = None


HF_DEFAULTS = Hyperparameters(
    gradient_accumulation_steps=1, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
    max_grad_norm=1.0, warmup_steps=0, precision="fp32",
)


def load_config(config: Mapping[str, Any] | str | os.PathLike) -> dict:
    """Return a private copy of a config given as a dict or a JSON file path.

    Raises:
        ConfigError: the file is missing or is not valid JSON (with line and column), or
            the config is neither a mapping nor a path.
    """
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError([f"config must be a dict or a path to a JSON file, got {type(config).__name__}"])
    path = os.fspath(config)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError([f"config file {path!r} does not exist: pass a dict or the path "
                           "of an existing DeepSpeed JSON config"], source=path) from None
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError([f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); fix the "
                           "file at that line (JSON allows no comments or trailing commas)"],
                          source=path) from None
    if not isinstance(loaded, dict):
        raise ConfigError([f"{path}: the top level must be a JSON object, got {type(loaded).__name__}"],
                          source=path)
    return loaded


def resolve_config(
    config: Mapping[str, Any] | str | os.PathLike,
    *,
    world_size: int,
    hparams: Hyperparameters | None = None,
    total_steps: int | None = None,
    hidden_size: int | None = None,
) -> dict:
    """Validate a DeepSpeed config and replace every ``"auto"`` with a concrete value.

    Args:
        config: a config dict or a JSON file path; never modified.
        world_size: the number of data-parallel ranks.
        hparams: the loop's values for ``"auto"`` keys and for the mismatch check.
        total_steps: optimizer steps of the whole run, for schedulers' ``total_num_steps``.
        hidden_size: the model's hidden size, for bucket ``"auto"`` values.

    Returns:
        A new dict DeepSpeed accepts, with no ``"auto"`` left.

    Raises:
        ConfigError: listing every problem found, each with its key and fix.
    """
    cfg = load_config(config)
    source = None if isinstance(config, Mapping) else os.fspath(config)
    hp = hparams or Hyperparameters()
    problems = validate_structure(cfg)
    if not problems:  # resolving a structurally broken config only adds noise
        problems += check_mismatches(cfg, hp)
        problems += resolve_precision(cfg, hp)
        problems += resolve_batch(cfg, hp, world_size)
        problems += resolve_optimizer(cfg, hp)
        problems += resolve_scheduler(cfg, hp, total_steps)
        problems += resolve_buckets(cfg, hidden_size)
        problems += [f"{key}: \"auto\" cannot be resolved here; set a value" for key in find_auto(cfg)]
    if not problems:  # values filled in from the loop's arguments meet the constructors too
        from .constructors import optimizer_problems, scheduler_problems

        problems += optimizer_problems(cfg) + scheduler_problems(cfg)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def batch_sizes(config: Mapping[str, Any], hparams: Hyperparameters, world_size: int) -> tuple[int, int] | None:
    """``(micro_batch_size, gradient_accumulation_steps)`` if the config resolves, else None.

    The loop needs the micro-batch to build its loader before the rest of the config
    (scheduler lengths) can be resolved; a config that fails here is reported in full by
    :func:`resolve_config`.
    """
    cfg = copy.deepcopy(dict(config))
    if validate_structure(cfg) or resolve_batch(cfg, hparams, world_size):
        return None
    return cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]


# --- structure -------------------------------------------------------------------------


def validate_structure(cfg: dict) -> list[str]:
    """Problems with keys, types and ranges, before any ``"auto"`` is resolved."""
    problems = unknown_keys(cfg, KNOWN_TOP_LEVEL_KEYS, prefix="")
    problems += check_batch_types(cfg)
    problems += check_number(cfg, "gradient_clipping", minimum=0.0)
    not_objects = check_sections_are_objects(cfg)
    if not_objects:  # the checks below read inside the sections
        return problems + not_objects
    problems += check_precision(cfg)
    problems += check_fp16(cfg.get("fp16", {}))
    problems += check_zero(cfg.get("zero_optimization", {}))
    problems += check_named_section(cfg, "optimizer")
    problems += check_named_section(cfg, "scheduler")
    problems += check_against_deepspeed(cfg)
    return problems


# Sections read inside by the checks above and below; the rest is swept for numbers written as strings.
CHECKED_SECTIONS = frozenset({*BATCH_KEYS, "gradient_clipping", "fp16", "bf16", "zero_optimization", "optimizer",
                              "scheduler", "activation_checkpointing", "compile", "tensorboard", "wandb",
                              "csv_monitor", "comet", "comms_logger"})


def check_against_deepspeed(cfg: Mapping) -> list[str]:
    """Each section against what DeepSpeed builds from it: the optimizer's and scheduler's
    constructors (:mod:`zeroloop.constructors`), DeepSpeed's pydantic schemas
    (:mod:`zeroloop.schemas`); numbers written as strings anywhere else."""
    from .constructors import optimizer_problems, scheduler_problems
    from .schemas import numeric_string_problems, schema_problems

    problems = optimizer_problems(cfg) + scheduler_problems(cfg)
    problems += schema_problems(cfg, skip={"zero_optimization": {"stage"}})
    rest = {key: value for key, value in cfg.items() if key not in CHECKED_SECTIONS}
    return problems + numeric_string_problems(rest, "")


def unknown_keys(section: Mapping, known: frozenset | set, prefix: str) -> list[str]:
    problems = []
    for key in section:
        if key in known:
            continue
        guess = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
        hint = f"did you mean {prefix}{guess[0]!r}?" if guess else "remove it or check the DeepSpeed docs"
        problems.append(f"{prefix}{key}: unknown key ({hint})")
    return problems


def check_batch_types(cfg: Mapping) -> list[str]:
    problems = []
    for key in BATCH_KEYS:
        value = cfg.get(key)
        if value is None or value == AUTO:
            continue
        if not is_int(value):
            problems.append(f"{key}: must be a positive integer or \"auto\", got {value!r} "
                            f"({type(value).__name__}); write {suggest_int(value)}")
        elif not is_positive_int(value):
            problems.append(f"{key}: must be >= 1, got {value}")
    return problems


def check_sections_are_objects(cfg: Mapping) -> list[str]:
    sections = ("fp16", "bf16", "torch_autocast", "zero_optimization", "optimizer", "scheduler",
                "activation_checkpointing", "compile", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger")
    return [f"{key}: must be a JSON object, got {type(cfg[key]).__name__}"
            for key in sections if key in cfg and not isinstance(cfg[key], Mapping)]


def check_precision(cfg: Mapping) -> list[str]:
    problems = []
    for key in ("fp16", "bf16"):
        enabled = cfg.get(key, {}).get("enabled", False)
        if enabled not in (True, False, AUTO):
            problems.append(f"{key}.enabled: must be true, false or \"auto\", got {enabled!r}")
    if cfg.get("fp16", {}).get("enabled") is True and cfg.get("bf16", {}).get("enabled") is True:
        problems.append("fp16.enabled and bf16.enabled are both true: enable one of them "
                        "(bf16 needs no loss scaling; prefer it where the hardware has it)")
    if autocast_on(cfg):
        problems += [f"{key}.enabled and torch_autocast.enabled are both true: DeepSpeed's autocast keeps fp32 "
                     f"weights, its {key} mode {key} weights; enable one of them" for key in ("fp16", "bf16")
                     if cfg.get(key, {}).get("enabled") is True]
    return problems


def autocast_on(cfg: Mapping) -> bool:
    """DeepSpeed's torch_autocast is enabled: fp32 weights, the 16-bit compute by autocast."""
    section = cfg.get("torch_autocast")
    return isinstance(section, Mapping) and section.get("enabled") is True


FP16_KEYS = frozenset({"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window",
                       "hysteresis", "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"})


def check_fp16(fp16: Mapping) -> list[str]:
    """The loss-scaling knobs: types and ranges (``loss_scale`` 0 means dynamic)."""
    problems = unknown_keys(fp16, FP16_KEYS, prefix="fp16.")
    problems += check_number(fp16, "loss_scale", minimum=0, prefix="fp16.")
    for key, minimum, maximum in (("initial_scale_power", 0, 64), ("loss_scale_window", 1, None),
                                  ("hysteresis", 1, None)):
        value = fp16.get(key)
        if value is None:
            continue
        if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            problems.append(f"fp16.{key}: must be a whole number {bound}, got {value!r}")
    min_scale = fp16.get("min_loss_scale")
    if min_scale is not None and (not is_number(min_scale) or min_scale <= 0):
        problems.append(f"fp16.min_loss_scale: must be a number > 0, got {min_scale!r}")
    for key in ("consecutive_hysteresis", "auto_cast"):
        if key in fp16 and not isinstance(fp16[key], bool):
            problems.append(f"fp16.{key}: must be true or false, got {fp16[key]!r}")
    return problems


def check_zero(zero: Mapping) -> list[str]:
    """The stage and what depends on it; keys, types and bounds are DeepSpeed's schema's
    (:func:`zeroloop.schemas.schema_problems`)."""
    problems = []
    stage = zero.get("stage", 0)
    if not is_int(stage) or not 0 <= stage <= 3:
        problems.append(f"zero_optimization.stage: must be 0, 1, 2 or 3, got {stage!r}")
        stage = 3  # do not also report every stage-3 key
    if stage < 3:
        for key in sorted(k for k in zero if k.startswith("stage3_") or k == "offload_param"):
            problems.append(f"zero_optimization.{key}: only used by ZeRO stage 3 but stage is {stage}; "
                            "remove it or set \"stage\": 3")
    for key in ("offload_optimizer", "offload_param"):
        offload = zero.get(key)
        if isinstance(offload, Mapping) and offload.get("device") == "nvme" and not offload.get("nvme_path"):
            problems.append(f"zero_optimization.{key}.nvme_path: offloading to nvme needs a path on a local "
                            "NVMe drive, e.g. \"nvme_path\": \"/local_nvme\"")
    return problems


def check_number(section: Mapping, key: str, minimum: float, prefix: str = "") -> list[str]:
    if key not in section or section[key] == AUTO:
        return []
    value = section[key]
    if not is_number(value):
        return [f"{prefix}{key}: must be a number, got {value!r} ({type(value).__name__})"]
    if value < minimum:
        return [f"{prefix}{key}: must be >= {minimum}, got {value}"]
    return []


def check_named_section(cfg: Mapping, key: str) -> list[str]:
    section = cfg.get(key)
    if section is None:
        return []
    problems = []
    example = "AdamW" if key == "optimizer" else "WarmupDecayLR"
    if not isinstance(section.get("type"), str):
        problems.append(f"{key}.type: required, a name such as \"{example}\"")
    if not isinstance(section.get("params", {}), Mapping):
        problems.append(f"{key}.params: must be a JSON object")
    return problems


# --- "auto" resolution ---------------------------------------------------------------------

# (config path, Hyperparameters field) pairs whose explicit values must agree.
MATCHED_KEYS = (
    (("train_micro_batch_size_per_gpu",), "micro_batch_size"),
    (("gradient_accumulation_steps",), "gradient_accumulation_steps"),
    (("gradient_clipping",), "max_grad_norm"),
    (("optimizer", "params", "lr"), "lr"),
    (("optimizer", "params", "betas"), "betas"),
    (("optimizer", "params", "eps"), "eps"),
    (("optimizer", "params", "weight_decay"), "weight_decay"),
)


def check_mismatches(cfg: Mapping, hp: Hyperparameters) -> list[str]:
    """Explicit config values that contradict loop arguments, all of them."""
    problems = []
    for path, field in MATCHED_KEYS:
        given = getattr(hp, field)
        value = get_path(cfg, path)
        if given is None or value is None or value == AUTO:
            continue
        if not same_value(value, given):
            key = ".".join(path)
            problems.append(f"{key}: the config says {value!r} but the loop was given {field}={given!r}; "
                            f"set {key} to \"auto\" or make the two agree")
    if hp.precision is not None:
        for key in ("fp16", "bf16"):
            enabled = cfg.get(key, {}).get("enabled")
            if enabled in (True, False) and enabled != (hp.precision == key):
                problems.append(f"{key}.enabled: the config says {str(enabled).lower()} but the loop was "
                                f"given precision={hp.precision!r}; set {key}.enabled to \"auto\" "
                                "or make the two agree")
    return problems


def resolve_precision(cfg: dict, hp: Hyperparameters) -> list[str]:
    precision = hp.precision or HF_DEFAULTS.precision
    if precision not in PRECISIONS:
        return [f"precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}"]
    for key in ("fp16", "bf16"):
        # Under the config's own torch_autocast the 16-bit compute is autocast's: no fp16/bf16 mode.
        if key in cfg and cfg[key].get("enabled") == AUTO:
            cfg[key]["enabled"] = precision == key and not autocast_on(cfg)
        elif key not in cfg and hp.precision == key and not autocast_on(cfg):
            cfg[key] = {"enabled": True}
    return []


def resolve_batch(cfg: dict, hp: Hyperparameters, world_size: int) -> list[str]:
    """Fill the batch triad the way DeepSpeed derives it, then check it multiplies out."""
    fill_auto(cfg, ("train_micro_batch_size_per_gpu",), hp.micro_batch_size)
    fill_auto(cfg, ("gradient_accumulation_steps",),
              hp.gradient_accumulation_steps or HF_DEFAULTS.gradient_accumulation_steps)
    micro = cfg.get("train_micro_batch_size_per_gpu")
    accum = cfg.get("gradient_accumulation_steps")
    total = cfg.get("train_batch_size")
    if micro == AUTO:
        return ["train_micro_batch_size_per_gpu: is \"auto\" but the loop was given no micro_batch_size; "
                "pass Hyperparameters(micro_batch_size=...) or set a number"]
    if total == AUTO:
        total = None
        cfg.pop("train_batch_size")
    if micro is None and total is None:
        if hp.micro_batch_size is None:
            return ["train_micro_batch_size_per_gpu: missing, and so is train_batch_size; set "
                    "train_micro_batch_size_per_gpu (samples per rank per micro-step)"]
        micro = hp.micro_batch_size
    if total is None:
        accum = accum or 1
        total = micro * accum * world_size
    elif micro is None:
        accum = accum or 1
        micro, rest = divmod(total, accum * world_size)
        if rest or micro == 0:
            return [f"train_batch_size: {total} is not divisible by gradient_accumulation_steps ({accum}) "
                    f"x world size ({world_size}); set train_batch_size to a multiple of "
                    f"{accum * world_size} or use train_micro_batch_size_per_gpu"]
    elif accum is None:
        accum, rest = divmod(total, micro * world_size)
        if rest or accum == 0:
            return [f"train_batch_size: {total} is not divisible by train_micro_batch_size_per_gpu "
                    f"({micro}) x world size ({world_size}); set it to a multiple of {micro * world_size} "
                    "or to \"auto\""]
    if total != micro * accum * world_size:
        return [f"train_batch_size: {total} != train_micro_batch_size_per_gpu ({micro}) x "
                f"gradient_accumulation_steps ({accum}) x world size ({world_size}) = "
                f"{micro * accum * world_size}; set train_batch_size to \"auto\" or to that product"]
    cfg.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro,
               gradient_accumulation_steps=accum)
    return []


def resolve_optimizer(cfg: dict, hp: Hyperparameters) -> list[str]:
    fill_auto(cfg, ("gradient_clipping",), pick(hp.max_grad_norm, HF_DEFAULTS.max_grad_norm))
    for field in ("lr", "betas", "eps", "weight_decay"):
        value = pick(getattr(hp, field), getattr(HF_DEFAULTS, field))
        fill_auto(cfg, ("optimizer", "params", field), list(value) if field == "betas" else value)
    return []


def resolve_scheduler(cfg: dict, hp: Hyperparameters, total_steps: int | None) -> list[str]:
    params = cfg.get("scheduler", {}).get("params", {})
    lr = get_path(cfg, ("optimizer", "params", "lr"))
    peak_lr = lr if isinstance(lr, numbers.Real) else pick(hp.lr, HF_DEFAULTS.lr)
    fill_auto(cfg, ("scheduler", "params", "warmup_min_lr"), 0.0)
    fill_auto(cfg, ("scheduler", "params", "warmup_max_lr"), peak_lr)
    fill_auto(cfg, ("scheduler", "params", "warmup_num_steps"), pick(hp.warmup_steps, HF_DEFAULTS.warmup_steps))
    if params.get("total_num_steps") == AUTO:
        if total_steps is None:
            return ["scheduler.params.total_num_steps: is \"auto\" but the run length is unknown; pass "
                    "max_steps (or epochs with a sized dataset) to the loop, or set a number"]
        params["total_num_steps"] = total_steps
    return []


def resolve_buckets(cfg: dict, hidden_size: int | None) -> list[str]:
    """Bucket sizes from the hidden size, as Hugging Face does (h*h, 0.9*h*h, 10*h)."""
    zero = cfg.get("zero_optimization", {})
    if hidden_size:
        sizes = {
            "reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
        }
    else:
        sizes = DEFAULT_BUCKETS
    for key, size in sizes.items():
        fill_auto(zero, (key,), size)
    return []


# --- small helpers --------------------------------------------------------------------------


def find_auto(section: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every ``"auto"`` value still in ``section``."""
    if isinstance(section, Mapping):
        found = []
        for key, value in section.items():
            found += find_auto(value, f"{prefix}{key}.")
        return found
    return [prefix[:-1]] if section == AUTO else []


def fill_auto(section: dict, path: tuple[str, ...], value: Any) -> None:
    """Replace ``section[path]`` with ``value`` if it is ``"auto"`` (and ``value`` is known)."""
    *parents, last = path
    for key in parents:
        section = section.get(key)
        if not isinstance(section, dict):
            return
    if section.get(last) == AUTO and value is not None:
        section[last] = value


def get_path(section: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(section, Mapping) or key not in section:
            return None
        section = section[key]
    return section


def pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real):
        return float(a) == float(b)
    return a == b


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_int(value: Any) -> bool:
    """A whole number >= 1 (``True`` is not one): steps, counts, intervals."""
    return is_int(value) and value >= 1


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def suggest_int(value: Any) -> str:
    if isinstance(value, str) and value.strip().isdigit():
        return f"{int(value)} without quotes"
    return "a whole number such as 8"


def precision_of(cfg: Mapping) -> str:
    """``"fp16"``, ``"bf16"`` or ``"fp32"`` for a resolved config."""
    for key in ("fp16", "bf16"):
        if cfg.get(key, {}).get("enabled") is True:
            return key
    return "bf16" if cfg.get("bfloat16", {}).get("enabled") is True else "fp32"


def zero_stage_of(cfg: Mapping | None) -> int:
    """The config's ZeRO stage: 0 without a ``zero_optimization`` section (or a config), or
    with a stage that is not a whole number (the config's check reports that one)."""
    stage = ((cfg or {}).get("zero_optimization") or {}).get("stage", 0)
    return stage if is_int(stage) else 0

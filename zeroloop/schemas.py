"""Config sections checked against DeepSpeed's own schemas, before DeepSpeed reads them.

DeepSpeed validates ``zero_optimization`` (offload included), ``compile``, the monitors
(``tensorboard``, ``wandb``, ``csv_monitor``, ``comet``) and ``comms_logger`` with pydantic
models, one section at a time, and its errors arrive raw from inside ``deepspeed.initialize``.
zeroloop reads the same models (fields, aliases, types, bounds, DeepSpeed's validators) and
reports every problem at once, naming the key. ``activation_checkpointing`` has no model: its
keys and their types are DeepSpeed's defaults table (``ACT_CHKPT_DEFAULT``).

Stricter than pydantic on one point: a number written as a string (``"ratio": "0.5"``) is
refused, where pydantic would convert it silently.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Mapping
from typing import Any, Iterator

from .expected import AUTO, did_you_mean, from_default, from_field, is_numeric_string, numeric_string, value_problems

# Top-level section -> (module, class) of the pydantic model DeepSpeed 0.16-0.19 builds it with.
SECTION_MODELS = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "compile": ("deepspeed.compile.config", "CompileConfig"),
    "comms_logger": ("deepspeed.comm.config", "CommsLoggerConfig"),
}
MONITORS = ("deepspeed.monitor.config", "DeepSpeedMonitorConfig")  # one field per monitor section
HINTS = {  # keys people carry over from other tools, and what DeepSpeed does instead
    "compile.enabled": "DeepSpeed compiles when engine.compile() is called, not from the config; call "
                       "self.engine.compile() in TrainerLoop.on_train_start",
}
LISTED_KEYS = 12  # name the accepted keys in the message up to this many


def section_models() -> dict[str, type]:
    """Every top-level section DeepSpeed validates with a pydantic model, and the model."""
    models = {key: getattr(importlib.import_module(module), cls) for key, (module, cls) in SECTION_MODELS.items()}
    module, cls = MONITORS
    for key, field in getattr(importlib.import_module(module), cls).model_fields.items():
        models[key] = field.annotation
    return models


def schema_problems(cfg: Mapping, skip: Mapping[str, set] | None = None) -> list[str]:
    """Problems in every section DeepSpeed has a schema for, all of them.

    Args:
        cfg: the config (sections that are not JSON objects are reported elsewhere).
        skip: per section, keys checked by zeroloop.config with their own message.
    """
    skip = skip or {}
    problems = []
    for key, model in section_models().items():
        if isinstance(cfg.get(key), Mapping):
            problems += model_problems(cfg[key], model, f"{key}.", skip=skip.get(key, set()))
    if isinstance(cfg.get("activation_checkpointing"), Mapping):
        problems += activation_checkpointing_problems(cfg["activation_checkpointing"])
    return problems


def model_problems(section: Mapping, model: type, prefix: str, skip: set = frozenset()) -> list[str]:
    """``section`` against a DeepSpeed pydantic model: keys, value types and bounds, then the
    model's own validators on what passed."""
    fields = {}
    for name, field in model.model_fields.items():
        fields[name] = field
        if field.alias:
            fields[field.alias] = field
    problems, bad = [], set()
    for key, value in section.items():
        if key in skip:
            continue
        if key not in fields:
            problems.append(unknown_key(prefix, key, model, fields))
            bad.add(key)
            continue
        expected = from_field(fields[key])
        if expected.model is not None and isinstance(value, Mapping):
            found = model_problems(value, expected.model, f"{prefix}{key}.")
        else:
            found = value_problems(f"{prefix}{key}", value, expected)
        problems += found
        bad.update([key] if found else [])
    if not problems:
        checked = {k: v for k, v in section.items() if k not in bad and v != AUTO}
        problems += validator_problems(model, checked, prefix, skip)
    return problems


def unknown_key(prefix: str, key: str, model: type, fields: Mapping) -> str:
    if f"{prefix}{key}" in HINTS:
        return f"{prefix}{key}: unknown key; {HINTS[prefix + key]}"
    guess = did_you_mean(key, fields)
    if guess:
        return f"{prefix}{key}: unknown key (did you mean {prefix}{guess!r}?)"
    names = sorted(k for k, f in fields.items() if not (f.alias and k != f.alias))
    listed = f": {', '.join(names)}" if len(names) <= LISTED_KEYS else ""
    return f"{prefix}{key}: unknown key; remove it (DeepSpeed's {model.__name__} takes {len(names)} keys{listed})"


def validator_problems(model: type, section: Mapping, prefix: str, skip: set = frozenset()) -> list[str]:
    """Build the model as DeepSpeed does and report what its validators refuse (not about
    the ``skip`` keys: those are reported elsewhere)."""
    import pydantic

    try:
        with quiet_deepspeed():
            model(**section)
    except pydantic.ValidationError as e:
        return [f"{(prefix + '.'.join(map(str, error['loc']))).rstrip('.')}: {plain(error['msg'])}"
                for error in e.errors() if not (error["loc"] and error["loc"][0] in skip)]
    except (AssertionError, ValueError, TypeError) as e:
        return [f"{prefix[:-1]}: {e}"]
    return []


def plain(message: str) -> str:
    """A validator's own words, without pydantic's "Assertion failed, " or "Value error, "."""
    for lead in ("Assertion failed, ", "Value error, "):
        message = message.removeprefix(lead)
    return message


@contextlib.contextmanager
def quiet_deepspeed() -> Iterator[None]:
    """DeepSpeed logs its deprecation warnings when it builds the config; not twice."""
    logger = logging.getLogger("DeepSpeed")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def activation_checkpointing_problems(section: Mapping) -> list[str]:
    """Keys and value types of ``activation_checkpointing``, from DeepSpeed's defaults table."""
    from deepspeed.runtime.activation_checkpointing.config import ACT_CHKPT_DEFAULT

    problems = []
    for key, value in section.items():
        if key not in ACT_CHKPT_DEFAULT:
            guess = did_you_mean(key, ACT_CHKPT_DEFAULT)
            hint = f"did you mean activation_checkpointing.{guess!r}?" if guess else \
                f"DeepSpeed reads {', '.join(ACT_CHKPT_DEFAULT)}"
            problems.append(f"activation_checkpointing.{key}: unknown key ({hint})")
        else:
            problems += value_problems(f"activation_checkpointing.{key}", value, from_default(ACT_CHKPT_DEFAULT[key]))
    return problems


def numeric_string_problems(section: Any, prefix: str, exclude: set = frozenset()) -> list[str]:
    """Numbers written as strings anywhere in ``section`` (for sections with no schema here)."""
    if isinstance(section, Mapping):
        problems = []
        for key, value in section.items():
            if f"{prefix}{key}" not in exclude:
                problems += numeric_string_problems(value, f"{prefix}{key}.", exclude)
        return problems
    if isinstance(section, list):
        return [p for i, item in enumerate(section) for p in numeric_string_problems(item, f"{prefix[:-1]}[{i}].")]
    return [numeric_string(prefix[:-1], section)] if is_numeric_string(section) else []

"""The config's ``optimizer`` and ``scheduler``, checked against the constructors DeepSpeed will call.

DeepSpeed builds them inside ``deepspeed.initialize``, and some mistakes surface only at the
first step (``"lr": "1e-3"``), so zeroloop asks DeepSpeed's question first: which class does
this name build here, with this config, and does ``params`` fit its signature?

- The names are DeepSpeed's own (``runtime.config.DEEPSPEED_OPTIMIZERS``, any case;
  ``runtime.lr_schedules.VALID_LR_SCHEDULES``) and torch's optimizer and scheduler classes,
  which DeepSpeed builds by name too.
- The class is the one ``DeepSpeedEngine._configure_basic_optimizer`` picks: ``"Adam"`` is
  FusedAdam, DeepSpeedCPUAdam with ZeRO-Offload, torch's Adam/AdamW with ``torch_adam``; the
  parameters DeepSpeed takes out first (``torch_adam``, ``adam_w_mode``) or passes itself
  (``adamw_mode`` to the CPU Adam) are read from the installed DeepSpeed where it names them.
- The parameters are checked against that class's signature: unknown names (with "did you
  mean"), wrong types, numbers written as strings, tuple lengths, required ones missing.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from .expected import (ANYTHING, Expected, did_you_mean, from_parameter, is_numeric_string, kinds, numeric_string,
                       value_problems)


@dataclass
class Target:
    """The class DeepSpeed will build for a config section, and how it calls it.

    Attributes:
        cls: the class (None when it cannot be imported here: only value types are checked).
        what: how to name it in a message, e.g. ``FusedAdam (DeepSpeed's "AdamW" without offload)``.
        leading: positional arguments DeepSpeed passes before ``**params``.
        taken: parameters DeepSpeed reads itself and does not pass on, with what they take.
        passed: parameters DeepSpeed passes itself: giving them too fails; with the fix.
        per_group_numbers: numbers may also be lists (one per parameter group).
    """

    cls: type | None
    what: str
    leading: int = 1
    taken: dict[str, Expected] = field(default_factory=dict)
    passed: dict[str, str] = field(default_factory=dict)
    per_group_numbers: bool = False


# --- optimizer ---------------------------------------------------------------------------------


def optimizer_problems(cfg: Mapping) -> list[str]:
    """Problems with ``optimizer.type`` and ``optimizer.params``, all of them."""
    section = cfg.get("optimizer")
    if not isinstance(section, Mapping) or not isinstance(section.get("type"), str):
        return []  # reported by zeroloop.config
    name, params = section["type"], section.get("params") or {}
    if not isinstance(params, Mapping):
        return []
    target = optimizer_target(name, params, cfg)
    if isinstance(target, str):
        return [target]
    problems = []
    if "max_grad_norm" in params:  # DeepSpeed raises for it whatever the optimizer
        problems.append("optimizer.params.max_grad_norm: DeepSpeed refuses it as an optimizer parameter; "
                        "set the top-level \"gradient_clipping\" instead")
        params = {k: v for k, v in params.items() if k != "max_grad_norm"}
    return problems + params_problems("optimizer.params", params, target)


def optimizer_target(name: str, params: Mapping, cfg: Mapping) -> Target | str:
    """The class DeepSpeed builds for ``optimizer.type``, or the problem with the name."""
    import torch
    from deepspeed.runtime import config as ds

    lower = name.lower()
    if lower in ds.DEEPSPEED_OPTIMIZERS:
        return deepspeed_optimizer(lower, name, params, cfg)
    cls = getattr(torch.optim, name, None)
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
        return Target(cls, f"torch.optim.{name}")
    names = optimizer_names()
    guess = did_you_mean(name, names)
    hint = f"did you mean {guess!r}? " if guess else ""
    return (f"optimizer.type: {name!r} is not an optimizer DeepSpeed can build; {hint}DeepSpeed builds "
            f"{', '.join(names)} (or pass optimizer= to the loop)")


def optimizer_names() -> list[str]:
    """DeepSpeed's optimizer names (spelled as torch spells them where torch has one), then
    torch's optimizer classes."""
    import torch
    from deepspeed.runtime import config as ds

    torch_names = [n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
                   and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != "Optimizer"]
    spelled = {n.lower(): n for n in torch_names}
    ours = [spelled.get(n, n) for n in ds.DEEPSPEED_OPTIMIZERS]
    return ours + [n for n in torch_names if n not in ours]


def deepspeed_optimizer(lower: str, name: str, params: Mapping, cfg: Mapping) -> Target | str:
    """Mirrors ``DeepSpeedEngine._configure_basic_optimizer`` (DeepSpeed 0.16-0.19)."""
    from deepspeed.runtime import config as ds

    offload = offloads_optimizer(cfg)
    where = " with ZeRO-Offload" if offload else ""
    if lower in (ds.ADAM_OPTIMIZER, ds.ADAMW_OPTIMIZER):
        return adam_target(lower, name, params, cfg)
    if lower == ds.ADAGRAD_OPTIMIZER:
        if offload:
            from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad
            return Target(DeepSpeedCPUAdagrad, f"DeepSpeedCPUAdagrad (DeepSpeed's {name!r}{where})")
        import torch
        return Target(torch.optim.Adagrad, f"torch.optim.Adagrad (DeepSpeed's {name!r})")
    if lower == ds.LAMB_OPTIMIZER:
        from deepspeed.ops.lamb import FusedLamb
        return Target(FusedLamb, f"FusedLamb (DeepSpeed's {name!r})")
    if lower == getattr(ds, "LION_OPTIMIZER", None):
        from deepspeed.ops import lion
        cls = lion.DeepSpeedCPULion if offload else lion.FusedLion
        return Target(cls, f"{cls.__name__} (DeepSpeed's {name!r}{where})")
    if lower in one_bit_optimizers():
        stage = cfg.get("zero_optimization", {}).get("stage", 0)
        if stage:
            return f"optimizer.type: {name!r} does not work with ZeRO (zero_optimization.stage is {stage}); " \
                   "use stage 0 or another optimizer"
        return Target(one_bit_class(lower), f"DeepSpeed's {name!r}", leading=2)
    if lower.startswith("mu") and lower != getattr(ds, "MUON_OPTIMIZER", None):
        return mup_target(lower, name)
    return Target(None, f"DeepSpeed's {name!r}")  # Muon: DeepSpeed splits the params itself


def adam_target(lower: str, name: str, params: Mapping, cfg: Mapping) -> Target:
    """Adam and AdamW: torch's with ``torch_adam``, the CPU Adam under offload, else FusedAdam."""
    from deepspeed.runtime import config as ds
    from deepspeed.runtime.engine import DeepSpeedEngine

    taken = {ds.TORCH_ADAM_PARAM: kinds("bool"), ds.ADAM_W_MODE: kinds("bool")}
    if hasattr(DeepSpeedEngine, "get_optimizer_configuration"):  # 0.19 takes this one out itself
        taken["fp32_optimizer_states"] = kinds("bool", "none")
    w_mode = params.get(ds.ADAM_W_MODE, ds.ADAM_W_MODE_DEFAULT)
    adamw = lower == ds.ADAMW_OPTIMIZER or w_mode is True
    if params.get(ds.TORCH_ADAM_PARAM) is True:
        import torch
        cls = torch.optim.AdamW if adamw else torch.optim.Adam
        return Target(cls, f"torch.optim.{cls.__name__} (DeepSpeed's {name!r} with torch_adam)", taken=taken)
    if offloads_optimizer(cfg):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        passed = {"adamw_mode": f"DeepSpeed sets it from the optimizer type; use {ds.ADAM_W_MODE!r}"}
        if cfg.get("zero_optimization", {}).get("zenflow") is not None:
            passed["overlap_step"] = "DeepSpeed sets it from zero_optimization.zenflow"
        return Target(DeepSpeedCPUAdam, f"DeepSpeedCPUAdam (DeepSpeed's {name!r} with ZeRO-Offload)",
                      taken=taken, passed=passed)
    from deepspeed.ops.adam import FusedAdam
    return Target(FusedAdam, f"FusedAdam (DeepSpeed's {name!r} without offload)", taken=taken)


def one_bit_optimizers() -> dict[str, tuple[str, str]]:
    """The 1-bit optimizers this DeepSpeed has (0.16-0.18; gone in 0.19): name -> (module, class)."""
    from deepspeed.runtime import config as ds

    known = {"ONEBIT_ADAM_OPTIMIZER": ("adam", "OnebitAdam"), "ZERO_ONE_ADAM_OPTIMIZER": ("zoadam", "ZeroOneAdam"),
             "ONEBIT_LAMB_OPTIMIZER": ("lamb", "OnebitLamb")}
    return {getattr(ds, const): where for const, where in known.items() if hasattr(ds, const)}


def one_bit_class(lower: str) -> type | None:
    import importlib

    module, cls = one_bit_optimizers()[lower]
    try:
        return getattr(importlib.import_module(f"deepspeed.runtime.fp16.onebit.{module}"), cls)
    except Exception:  # needs cupy or mpi4py on some set-ups; check the values only
        return None


def mup_target(lower: str, name: str) -> Target | str:
    try:
        import mup
    except ImportError:
        return (f"optimizer.type: {name!r} is built from the mup package, which is not installed; "
                "pip install mup, or choose another optimizer")
    cls = {"muadam": mup.MuAdam, "muadamw": mup.MuAdamW, "musgd": mup.MuSGD}.get(lower)
    return Target(cls, f"mup.{cls.__name__ if cls else name}")


def offloads_optimizer(cfg: Mapping) -> bool:
    """DeepSpeed's ``zero_use_cpu_optimizer``: the optimizer offloaded to cpu or nvme."""
    offload = cfg.get("zero_optimization", {}).get("offload_optimizer")
    return isinstance(offload, Mapping) and offload.get("device") in ("cpu", "nvme")


# --- scheduler ---------------------------------------------------------------------------------


def scheduler_problems(cfg: Mapping) -> list[str]:
    """Problems with ``scheduler.type`` and ``scheduler.params``, all of them."""
    section = cfg.get("scheduler")
    if not isinstance(section, Mapping) or not isinstance(section.get("type"), str):
        return []
    params = section.get("params") or {}
    if not isinstance(params, Mapping):
        return []
    target = scheduler_target(section["type"])
    if isinstance(target, str):
        return [target]
    return params_problems("scheduler.params", params, target)


def scheduler_target(name: str) -> Target | str:
    """The class DeepSpeed builds for ``scheduler.type`` (its own first, then torch's), or the problem."""
    from deepspeed.runtime import lr_schedules

    if name in lr_schedules.VALID_LR_SCHEDULES:
        return Target(getattr(lr_schedules, name), f"DeepSpeed's {name}", per_group_numbers=True)
    torch_names = torch_schedulers()
    if name in torch_names:
        cls = torch_names[name]
        if needs_step_argument(cls):
            return (f"scheduler.type: {name} needs the metric at every step() and DeepSpeed's engine calls "
                    "step() without one; build it yourself (lr_scheduler= to the loop) and step it with "
                    "the metric, e.g. in on_evaluate")
        return Target(cls, f"torch.optim.lr_scheduler.{name}")
    names = list(lr_schedules.VALID_LR_SCHEDULES) + sorted(torch_names)
    guess = did_you_mean(name, names)
    hint = f"did you mean {guess!r}? " if guess else ""
    return (f"scheduler.type: {name!r} is not a scheduler DeepSpeed can build; {hint}DeepSpeed builds "
            f"{', '.join(names)} (or pass lr_scheduler= to the loop)")


def torch_schedulers() -> dict[str, type]:
    from torch.optim import lr_scheduler

    base = getattr(lr_scheduler, "LRScheduler", lr_scheduler._LRScheduler)
    return {n: c for n, c in vars(lr_scheduler).items()
            if isinstance(c, type) and issubclass(c, base) and not n.startswith("_") and c is not base}


def needs_step_argument(cls: type) -> bool:
    """A scheduler whose ``step()`` needs an argument (ReduceLROnPlateau's metric)."""
    try:
        parameters = list(inspect.signature(cls.step).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    return any(p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               for p in parameters)


# --- parameters against a signature ----------------------------------------------------------


def params_problems(prefix: str, params: Mapping, target: Target) -> list[str]:
    """``params`` against the constructor of ``target``: names, types, required ones."""
    accepted = signature_params(target)
    open_ended = accepted is None or any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    namespace = getattr(getattr(target.cls, "__init__", None), "__globals__", None)
    problems = []
    for key, value in params.items():
        path = f"{prefix}.{key}"
        if key in target.taken:
            problems += value_problems(path, value, target.taken[key])
        elif key in target.passed:
            problems.append(f"{path}: {target.what} gets it from DeepSpeed, not from the config; "
                            f"{target.passed[key]}")
        elif accepted is not None and key in accepted:
            problems += value_problems(path, value, expected_of(accepted[key], namespace, target))
        elif open_ended:
            problems += [numeric_string(path, value)] if is_numeric_string(value) else []
        else:
            problems.append(unknown_param(path, key, target, [*accepted, *target.taken]))
    if accepted is not None:
        problems += missing_params(prefix, params, accepted, namespace, target)
    return problems


def missing_params(prefix: str, params: Mapping, accepted: dict[str, inspect.Parameter], namespace: dict | None,
                   target: Target) -> list[str]:
    """Required parameters the config leaves out (a function or an object it cannot give)."""
    problems = []
    for name, parameter in accepted.items():
        if parameter.default is not parameter.empty or name in params or \
                parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            continue
        expected = expected_of(parameter, namespace, target)
        if not json_can_hold(expected):
            argument = "optimizer=" if prefix.startswith("optimizer") else "lr_scheduler="
            problems.append(f"{prefix}.{name}: {target.what} needs a Python object here (a function, a tensor...), "
                            f"which a JSON config cannot hold; build it in Python and pass {argument} to the loop")
        else:
            problems.append(f"{prefix}.{name}: required by {target.what}; set it"
                            + (" (\"auto\" takes the run's length)" if name == "total_num_steps" else ""))
    return problems


def signature_params(target: Target) -> dict[str, inspect.Parameter] | None:
    """The parameters ``**params`` can fill (after the leading positional ones), or None."""
    if target.cls is None:
        return None
    try:
        parameters = list(inspect.signature(target.cls).parameters.values())
    except (TypeError, ValueError):
        return None
    fillable = parameters[target.leading:]
    return {p.name: p for p in fillable if p.kind is not p.VAR_POSITIONAL}


def expected_of(parameter: inspect.Parameter, namespace: dict | None, target: Target) -> Expected:
    if parameter.kind is parameter.VAR_KEYWORD:
        return ANYTHING
    expected = from_parameter(parameter, namespace)
    if target.per_group_numbers and "number" in expected.kinds:  # DeepSpeed's _format_param
        expected = replace(expected, kinds=expected.kinds | {"list"}, items=kinds("number"))
    return expected


def json_can_hold(expected: Expected) -> bool:
    """Whether some JSON value fits (not for a function or a tensor, nor a list of them)."""
    if not expected.kinds:
        return True
    plain = {"bool", "int", "whole", "number", "str", "mapping"}
    return bool(expected.kinds & plain) or \
        ("list" in expected.kinds and (expected.items is None or json_can_hold(expected.items)))


def unknown_param(path: str, key: str, target: Target, names: list[str]) -> str:
    names = [n for n in dict.fromkeys(names) if n not in target.passed]
    guess = did_you_mean(key, names)
    hint = f"did you mean {guess!r}? " if guess else ""
    return f"{path}: {target.what} takes no parameter {key!r}; {hint}it takes {', '.join(names)}"


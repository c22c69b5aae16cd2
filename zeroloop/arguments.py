"""``TrainerLoop``'s arguments, checked before anything is built.

Each check returns problems (``"argument: what is wrong; the fix"``) instead of raising, so
the loop reports them all at once in one :class:`~zeroloop.config.ConfigError`, on every rank,
before the process group or the engine exists. Pure logic: no ranks needed to test it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any, Callable

from torch import nn

from .config import is_positive_int


def run_length_problems(max_steps: Any, epochs: Any, eval_every: Any) -> list[str]:
    """No run length, or lengths and intervals that are not positive integers."""
    problems = []
    if max_steps is None and epochs is None:
        problems.append("max_steps / epochs: give at least one (optimizer steps, or passes over train_data)")
    for name, value in (("max_steps", max_steps), ("epochs", epochs), ("eval_every", eval_every)):
        if value is not None and not is_positive_int(value):
            problems.append(f"{name}: must be a positive integer or None, got {value!r}")
    return problems


def settings_problems(*settings: Any) -> list[str]:
    """The ``problems()`` of each settings object given (``log``, ``health``, ``checkpoint``...),
    in order; None, and values that are not settings objects (``True``), add nothing."""
    return [problem for each in settings if hasattr(each, "problems") for problem in each.problems()]


def model_problems(model: Any) -> list[str]:
    """A model that is not a module, or has nothing to train."""
    if not isinstance(model, nn.Module):
        return [f"model: must be a torch.nn.Module, got {type(model).__name__}"]
    parameters = list(model.parameters())
    if not parameters:
        return [f"model: {type(model).__name__} has no parameters, so there is nothing to train"]
    if not any(p.requires_grad for p in parameters):
        return [f"model: none of {type(model).__name__}'s {len(parameters)} parameters is trainable (all have "
                "requires_grad=False); unfreeze the ones to train (p.requires_grad_(True)) before building "
                "the loop"]
    return []


def output_dir_problems(path: str) -> list[str]:
    """An ``output_dir`` that is a file, lies under a file, or cannot be written."""
    # A file first, asking isdir last: another rank may create the folder between two checks.
    if os.path.lexists(path) and not os.path.isdir(path):
        return [f"output_dir: {path!r} is a file, not a folder; pass a folder (it is created if missing)"]
    if os.path.isdir(path):
        return [] if writable(path) else [f"output_dir: {path!r} is not writable by this process; choose "
                                          "another folder or fix its permissions"]
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return [f"output_dir: {path!r} cannot be created because {parent!r} is a file; pass a folder path"]
    if not writable(parent):
        return [f"output_dir: {path!r} cannot be created: {parent!r} is not writable by this process; "
                "choose another folder or fix its permissions"]
    return []


def writable(folder: str) -> bool:
    """Whether this process may create files in ``folder`` (a read-only mount counts)."""
    effective = os.access in os.supports_effective_ids
    return os.access(folder, os.W_OK | os.X_OK, effective_ids=effective)


def client_problems(optimizer: Any, lr_scheduler: Any) -> list[str]:
    """``optimizer=`` / ``lr_scheduler=`` of kinds DeepSpeed refuses (it asserts, deep inside)."""
    import torch

    problems = []
    built_optimizer = isinstance(optimizer, torch.optim.Optimizer)
    if optimizer is not None and not built_optimizer and not callable(optimizer):
        problems.append(f"optimizer: must be a torch.optim.Optimizer or a callable taking the model's "
                        f"parameters, got {type(optimizer).__name__}")
    built_scheduler = hasattr(lr_scheduler, "step") and not inspect.isclass(lr_scheduler)
    if lr_scheduler is not None and not built_scheduler and not callable(lr_scheduler):
        problems.append(f"lr_scheduler: must be a scheduler or a callable taking the optimizer, "
                        f"got {type(lr_scheduler).__name__}")
    if built_scheduler and not built_optimizer:
        problems.append("lr_scheduler: an already-built scheduler steps an optimizer the loop does not have; "
                        "pass the optimizer it was built on as optimizer=, or pass lr_scheduler as a callable "
                        "taking the optimizer")
    return problems


# --- batches and the default compute_loss ------------------------------------------------------------


def first_sample(train_data: Any) -> tuple[bool, Any]:
    """``(True, sample)`` for the first sample of a map-style dataset (or a DataLoader over one
    that collates as the default does), without consuming anything; ``(False, None)`` otherwise."""
    from torch.utils.data import DataLoader
    from torch.utils.data.dataloader import default_collate

    dataset = train_data
    if isinstance(train_data, DataLoader):
        if train_data.collate_fn is not default_collate:
            return False, None  # a custom collate may reshape the samples
        dataset = train_data.dataset
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")) or isinstance(dataset, (str, bytes)):
        return False, None
    try:
        return (True, dataset[0]) if len(dataset) else (False, None)
    except Exception:  # noqa: BLE001 - a dataset that cannot be peeked at is checked at the first batch
        return False, None


def batch_problems(model: nn.Module, batch: Any, loss_fn: Callable | None) -> list[str]:
    """A batch shape the default ``compute_loss`` cannot use with this model and ``loss_fn``."""
    if loss_fn is not None:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return []
        return [f"loss_fn: needs (inputs, targets) batches, but train_data gives {shape_of(batch)}; "
                "drop loss_fn= (the model then gets the batch) or override compute_loss"]
    if isinstance(batch, Mapping):
        args, kwargs, call = (), dict(batch), "model(**batch)"
    elif isinstance(batch, (tuple, list)):
        args, kwargs, call = tuple(batch), {}, "model(*batch)"
    else:
        args, kwargs, call = (batch,), {}, "model(batch)"
    try:
        signature = inspect.signature(model.forward)
        signature.bind(*args, **kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ValueError) and "signature" in str(e):
            return []  # a forward inspect cannot read
        pair = " for (inputs, targets) batches pass loss_fn=... (called as loss_fn(model(inputs), targets));" \
            if isinstance(batch, (tuple, list)) and len(batch) == 2 else ""
        return [f"train_data: the default compute_loss calls {call} with {shape_of(batch)}, and "
                f"{type(model).__name__}.forward{signature_text(model)} cannot take that ({e});{pair} "
                "or override compute_loss"]
    return []


def shape_of(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"dicts with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__}s of {len(batch)} items"
    return f"{type(batch).__name__} batches"


def signature_text(model: nn.Module) -> str:
    try:
        return str(inspect.signature(model.forward))
    except (TypeError, ValueError):
        return "(...)"

"""Activation checkpointing that trains the same model under every ZeRO stage.

Pick what to checkpoint with a small policy object, how with a backend, and hand one
:class:`ActivationCheckpointing` to ``TrainerLoop(activation_checkpointing=...)``; the loop
calls :func:`apply` before ``deepspeed.initialize``. Used alone::

    handle = apply(model, ActivationCheckpointing(ModuleClasses("Block"), every=2), ds_config)
    ...  # train
    handle.remove()  # every wrapped forward is the original again

Backends:
    ``"torch"``: ``torch.utils.checkpoint`` with ``use_reentrant=False`` and the RNG state
        preserved, so dropout recomputes the same mask. The default.
    ``"deepspeed"``: ``deepspeed.checkpointing.checkpoint``, configured from the config's
        ``activation_checkpointing`` section (partitioned / CPU / contiguous activations).
        It is *reentrant*: a block none of whose inputs requires grad would get no gradient
        at all, so floating inputs are given a grad-requiring alias, and a block with only
        integer inputs and trainable parameters is refused with an error naming it.
    ``"hf"``: a Hugging Face model's own ``gradient_checkpointing_enable``; the model picks
        its layers (no policy, ``every=1``).
    ``"auto"``: ``"hf"`` for a Hugging Face model without a policy, else ``"deepspeed"`` when
        the config has an ``activation_checkpointing`` section (or when ZeRO-3 with frozen
        parameters needs it, below), else ``"torch"``.

Frozen parameters under ZeRO-3: both ``"torch"`` and ``"deepspeed"`` train them correctly
with DeepSpeed 0.19.8 (its coordinator keeps frozen parameters gathered through a
recompute; DeepSpeed #8148). With a DeepSpeed without that fix, the non-reentrant
recompute fails, so "auto" picks "deepspeed" (reentrant, inputs guarded), "hf" passes
``use_reentrant=True`` and "torch" is refused. See docs/activation-checkpointing.md.
"""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .config import is_positive_int, zero_stage_of
from .errors import ConfigError

BACKENDS = ("auto", "torch", "deepspeed", "hf")
CONTAINERS = (nn.ModuleList, nn.ModuleDict)  # modules that are never called
DS_SECTION = "activation_checkpointing"  # the DeepSpeed config section of the "deepspeed" backend


# --- policies: which modules to checkpoint -------------------------------------------------


class CheckpointPolicy(ABC):
    """Chooses modules to checkpoint from ``model.named_modules()``.

    A module inside an already chosen one is skipped (checkpointing both would recompute
    the inner one twice), and the model itself is never chosen.
    """

    @abstractmethod
    def selects(self, name: str, module: nn.Module) -> bool:
        """Whether to checkpoint ``module``, found at ``name`` in ``named_modules()``."""

    def matcher(self, model: nn.Module) -> Callable[[str, nn.Module], bool]:
        """``selects`` for this model; override to look at the model as a whole first."""
        return self.selects


@dataclass(frozen=True)
class ModuleClasses(CheckpointPolicy):
    """Modules of the given classes: types (subclasses count) or class names.

    A name matches the class's ``__name__`` or its ``module.QualName``, e.g. ``"Block"``
    or ``"zeroloop.gpt.Block"``.
    """

    classes: tuple[type | str, ...]

    def __init__(self, *classes: type | str):
        if not classes:
            raise ValueError("ModuleClasses: give at least one class or class name, "
                             "e.g. ModuleClasses(Block)")
        for cls in classes:
            if not isinstance(cls, (type, str)):
                raise TypeError(f"ModuleClasses: {cls!r} is neither a class nor a class name")
        object.__setattr__(self, "classes", tuple(classes))

    def selects(self, name: str, module: nn.Module) -> bool:
        cls = type(module)
        names = {cls.__name__, f"{cls.__module__}.{cls.__qualname__}"}
        return any(isinstance(module, c) if isinstance(c, type) else c in names for c in self.classes)


@dataclass(frozen=True)
class NamePattern(CheckpointPolicy):
    """Modules whose ``named_modules()`` name fully matches a regular expression,
    e.g. ``r"blocks\\.\\d+"`` or ``r"model\\.layers\\.\\d+"``."""

    pattern: str

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"NamePattern: {self.pattern!r} is not a regular expression ({e})") from None

    def selects(self, name: str, module: nn.Module) -> bool:
        return re.fullmatch(self.pattern, name) is not None


@dataclass(frozen=True)
class Predicate(CheckpointPolicy):
    """Modules for which ``fn(name, module)`` is true."""

    fn: Callable[[str, nn.Module], bool]

    def selects(self, name: str, module: nn.Module) -> bool:
        return bool(self.fn(name, module))


@dataclass(frozen=True)
class RepeatedBlocks(CheckpointPolicy):
    """The entries of every ``nn.ModuleList``: a transformer's blocks (``model.blocks``,
    ``model.layers``...). The default policy."""

    def selects(self, name: str, module: nn.Module) -> bool:
        raise TypeError("RepeatedBlocks needs the whole model: use matcher(model)")

    def matcher(self, model: nn.Module) -> Callable[[str, nn.Module], bool]:
        entries = {id(child) for m in model.modules() if isinstance(m, nn.ModuleList) for child in m}
        return lambda name, module: id(module) in entries


def as_policy(policy: Any) -> CheckpointPolicy:
    """A policy from a policy, a class, a class name, or a ``(name, module)`` predicate.

    Raises:
        TypeError: anything else.
    """
    if policy is None:
        return RepeatedBlocks()
    if isinstance(policy, CheckpointPolicy):
        return policy
    if isinstance(policy, (type, str)):
        return ModuleClasses(policy)
    if isinstance(policy, (tuple, list)):
        return ModuleClasses(*policy)
    if callable(policy):
        return Predicate(policy)
    raise TypeError(f"activation_checkpointing.policy: expected a CheckpointPolicy, a module class, a class "
                    f"name or a callable(name, module), got {type(policy).__name__}")


# --- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationCheckpointing:
    """What to checkpoint and how; ``TrainerLoop(activation_checkpointing=...)`` takes one.

    Attributes:
        policy: a :class:`CheckpointPolicy`, a module class or class name (or a tuple of
            them), or a ``callable(name, module) -> bool``. None: the model's repeated
            blocks (:class:`RepeatedBlocks`), or a Hugging Face model's own choice.
        backend: ``"auto"``, ``"torch"``, ``"deepspeed"`` or ``"hf"`` (see the module doc).
        every: checkpoint every k-th selected module (the k-th, 2k-th, ...): fewer
            recomputes, more memory. 1 checkpoints all of them.
        preserve_rng_state: restore the RNG state for the recompute so dropout draws the
            same mask ("torch" and "hf"; DeepSpeed's backend always does).
    """

    policy: Any = None
    backend: str = "auto"
    every: int = 1
    preserve_rng_state: bool = True

    def problems(self) -> list[str]:
        """Every problem with these settings, one line each naming the field and the fix
        (empty when they are good); the loop raises them in one ConfigError."""
        found = []
        if self.backend not in BACKENDS:
            found.append(f"activation_checkpointing.backend: must be one of {', '.join(BACKENDS)}, "
                         f"got {self.backend!r}")
        if not is_positive_int(self.every):
            found.append(f"activation_checkpointing.every: must be a positive integer, got {self.every!r}")
        try:
            as_policy(self.policy)
        except TypeError as e:
            found.append(str(e))
        return found


# --- selection and backend choice -----------------------------------------------------------


def select_modules(model: nn.Module, policy: Any = None, every: int = 1) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs to checkpoint, in ``named_modules()`` order.

    Outermost matches only; never the model itself, nor a ``ModuleList``/``ModuleDict``
    (they have no forward: their entries are considered instead). Of those, the
    ``every``-th, ``2 * every``-th, ... are kept.
    """
    matches = as_policy(policy).matcher(model)
    chosen: list[tuple[str, nn.Module]] = []
    inside: set[int] = set()  # ids of modules under a chosen one
    for name, module in model.named_modules():
        # Containers are never called (no forward to wrap): look inside them instead.
        if module is model or id(module) in inside or isinstance(module, CONTAINERS):
            continue
        if matches(name, module):
            chosen.append((name, module))
            inside.update(id(m) for m in module.modules())
    return [pair for i, pair in enumerate(chosen, start=1) if i % every == 0]


def zero3_keeps_frozen_params_for_recompute() -> bool:
    """Whether this DeepSpeed's ZeRO-3 keeps frozen parameters gathered through a
    checkpoint recompute (DeepSpeed #8148, in 0.19.8). Without it, a non-reentrant
    recompute finds them re-partitioned to shape [0] and fails (transformers #47254)."""
    from deepspeed.runtime.zero import partitioned_param_coordinator

    return hasattr(partitioned_param_coordinator, "update_recompute_parameters")


def frozen_params_break_non_reentrant(model: nn.Module, ds_config: Mapping[str, Any] | None) -> bool:
    """ZeRO-3, a frozen parameter, and a DeepSpeed without the recompute fix: only a
    reentrant checkpoint works then."""
    if zero_stage_of(ds_config) != 3 or all(p.requires_grad for p in model.parameters()):
        return False
    return not zero3_keeps_frozen_params_for_recompute()


def is_hf_model(model: nn.Module) -> bool:
    return callable(getattr(model, "gradient_checkpointing_enable", None))


def choose_backend(model: nn.Module, settings: ActivationCheckpointing,
                   ds_config: Mapping[str, Any] | None = None) -> str:
    """The backend ``settings.backend`` means for this model and config.

    Raises:
        ValueError: ``"hf"`` for a model without ``gradient_checkpointing_enable``, or with
            a policy or ``every`` (a Hugging Face model picks its own layers); ``"torch"``
            where :func:`frozen_params_break_non_reentrant`.
    """
    backend = settings.backend
    broken = frozen_params_break_non_reentrant(model, ds_config)
    if backend == "auto":
        if is_hf_model(model) and settings.policy is None and settings.every == 1:
            backend = "hf"  # reentrant there when `broken` (see _apply_hf)
        elif broken or (ds_config is not None and DS_SECTION in ds_config):
            backend = "deepspeed"
        else:
            backend = "torch"
    if backend == "torch" and broken:
        raise ValueError("activation_checkpointing.backend=\"torch\": this DeepSpeed predates the ZeRO-3 "
                         "fix for frozen parameters in a non-reentrant recompute (DeepSpeed #8148; it fails "
                         "with CheckpointError, transformers #47254) and the model has frozen parameters; "
                         "use backend=\"deepspeed\" (or \"auto\"), or upgrade DeepSpeed")
    if backend == "hf":
        if not is_hf_model(model):
            raise ValueError(f"activation_checkpointing.backend=\"hf\": {type(model).__name__} has no "
                             "gradient_checkpointing_enable(); use backend=\"torch\" with a policy")
        if settings.policy is not None or settings.every != 1:
            raise ValueError("activation_checkpointing.backend=\"hf\": the model chooses its own layers; "
                             "drop policy/every, or use backend=\"torch\" to choose them")
    return backend


# --- the handle -----------------------------------------------------------------------------


class CheckpointHandle:
    """What :func:`apply` did; :meth:`remove` undoes it (idempotent).

    Attributes:
        backend: the backend used ("torch", "deepspeed" or "hf").
        names: the checkpointed modules' names (empty for "hf": the model chose).
    """

    def __init__(self, backend: str, names: list[str], undo: list[Callable[[], None]]):
        self.backend = backend
        self.names = names
        self._undo = undo

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> CheckpointHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"CheckpointHandle(backend={self.backend!r}, modules={len(self.names)})"


def apply(model: nn.Module, settings: ActivationCheckpointing | None = None,
          ds_config: Mapping[str, Any] | None = None) -> CheckpointHandle:
    """Checkpoint the modules ``settings`` chooses; call before ``deepspeed.initialize``.

    Args:
        model: the model (not yet wrapped by DeepSpeed).
        settings: what and how; None or True means ``ActivationCheckpointing()``.
        ds_config: the resolved DeepSpeed config; its ``activation_checkpointing`` section
            configures the "deepspeed" backend (and makes "auto" choose it).

    Returns:
        A :class:`CheckpointHandle`; ``handle.remove()`` restores every original forward.

    Raises:
        TypeError: ``settings`` is not an :class:`ActivationCheckpointing`.
        ConfigError: the settings' :meth:`~ActivationCheckpointing.problems`, all listed.
        ValueError: the policy selects no module, or a bad backend choice (see
            :func:`choose_backend`).
    """
    if settings is None or settings is True:
        settings = ActivationCheckpointing()
    if not isinstance(settings, ActivationCheckpointing):
        raise TypeError(f"activation_checkpointing: expected ActivationCheckpointing(...) (or True for the "
                        f"defaults), got {type(settings).__name__}; "
                        "e.g. ActivationCheckpointing(policy=Block)")
    if settings.problems():
        raise ConfigError(settings.problems(), subject="ActivationCheckpointing")
    backend = choose_backend(model, settings, ds_config)
    if backend == "hf":
        return _apply_hf(model, settings, ds_config)
    chosen = select_modules(model, settings.policy, settings.every)
    if not chosen:
        raise ValueError(f"activation checkpointing: the policy {as_policy(settings.policy)!r} (every="
                         f"{settings.every}) selects no module of {type(model).__name__}; check the class "
                         "names or pattern against model.named_modules()")
    undo = []
    if backend == "deepspeed":
        undo.append(_configure_deepspeed(ds_config, len(chosen)))
    for name, module in chosen:
        if backend == "torch":
            wrapped = _torch_checkpointed(module.forward, settings.preserve_rng_state)
        else:
            wrapped = _deepspeed_checkpointed(name, module, module.forward)
        undo.append(_replace_forward(module, wrapped))
    return CheckpointHandle(backend, [name for name, _ in chosen], undo)


def _replace_forward(module: nn.Module, wrapped: Callable) -> Callable[[], None]:
    """Set ``module.forward`` on the instance (``nn.Module.__call__`` then still runs its
    hooks, ZeRO-3's gathering ones included, around the checkpoint); return the undo."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = wrapped

    def undo():
        if had_own:
            module.forward = previous
        else:
            module.__dict__.pop("forward", None)

    return undo


# --- backends -------------------------------------------------------------------------------


def _torch_checkpointed(forward: Callable, preserve_rng_state: bool) -> Callable:
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing is saved for a backward
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state,
                          **kwargs)

    return checkpointed


def _deepspeed_checkpointed(name: str, module: nn.Module, forward: Callable) -> Callable:
    import deepspeed

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        args, kwargs = reentrant_inputs(name, module, args, kwargs)
        return deepspeed.checkpointing.checkpoint(forward, *args, **kwargs)

    return checkpointed


def reentrant_inputs(name: str, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The inputs to hand DeepSpeed's reentrant checkpoint of ``module``: fresh aliases.

    Every floating tensor becomes a new tensor object on the same storage, for two reasons:

    - A reentrant checkpoint is an autograd Function: when none of its inputs requires
      grad, its output does not either, and the parameters inside silently get no
      gradient. An input that does not require grad is first given a grad-requiring
      ``detach()`` (its gradient is computed and dropped); one that does keeps its graph.
    - ``partition_activations`` replaces the ``.data`` of the tensors it is given and
      restores them *flattened*; handed a ``view_as`` alias, it leaves the caller's tensor
      (which the model may use again) and the leaf autograd accumulates into unchanged.

    Raises:
        RuntimeError: no input is a floating tensor and the module has trainable
            parameters: they would silently get no gradient.
    """
    def alias(value):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        base = value if value.requires_grad else value.detach().requires_grad_()
        return base.view_as(base)  # a non-leaf: DeepSpeed may reshape it, autograd keeps base's shape

    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    can_require_grad = any(t.is_floating_point() or t.requires_grad for t in tensors)
    if not can_require_grad and any(p.requires_grad for p in module.parameters()):
        raise RuntimeError(
            f"activation checkpointing of {name!r} ({type(module).__name__}) with the reentrant "
            "\"deepspeed\" backend: none of its inputs is a floating tensor, so none can require grad "
            "and its parameters would get no gradient. Checkpoint a module whose input is a floating "
            "tensor (e.g. after the embedding), or use backend=\"torch\"")
    return tuple(alias(a) for a in args), {k: alias(v) for k, v in kwargs.items()}


def _configure_deepspeed(ds_config: Mapping[str, Any] | None, num_modules: int) -> Callable[[], None]:
    """Configure ``deepspeed.checkpointing`` from the config's section; return the undo.

    Raises:
        ValueError: ``cpu_checkpointing`` or ``contiguous_memory_optimization`` without
            ``partition_activations``.

    Contiguous memory needs the number of checkpoints up front (DeepSpeed asserts it);
    when the section leaves ``number_checkpoints`` out, the number of checkpointed
    modules is passed (Lightning never passes it: Lightning #20329).
    """
    import deepspeed

    section = dict((ds_config or {}).get(DS_SECTION) or {})
    partitioned = section.get("partition_activations", False)
    for key in ("cpu_checkpointing", "contiguous_memory_optimization"):
        if section.get(key) and not partitioned:
            # DeepSpeed asserts this for contiguous buffers; for cpu_checkpointing alone its
            # recompute receives emptied inputs (measured with 0.19.8).
            raise ValueError(f"activation_checkpointing.{key}: works only together with "
                             "partition_activations; set \"partition_activations\": true as well")
    num_checkpoints = None
    if section.get("contiguous_memory_optimization") and section.get("number_checkpoints") is None:
        num_checkpoints = num_modules
    if ds_config is not None and DS_SECTION in ds_config:
        deepspeed.checkpointing.configure(mpu_=None, deepspeed_config=dict(ds_config),
                                          num_checkpoints=num_checkpoints)
    else:
        deepspeed.checkpointing.configure(mpu_=None)

    def undo():
        deepspeed.checkpointing.reset()  # drops contiguous buffers and offloaded activations

    return undo


def _apply_hf(model: nn.Module, settings: ActivationCheckpointing,
              ds_config: Mapping[str, Any] | None) -> CheckpointHandle:
    was_enabled = bool(getattr(model, "is_gradient_checkpointing", False))
    # Reentrant only where non-reentrant fails; Hugging Face then makes the embedding
    # output require grad itself (enable_input_require_grads), which avoids the pitfall.
    reentrant = frozen_params_break_non_reentrant(model, ds_config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
        "use_reentrant": reentrant, "preserve_rng_state": settings.preserve_rng_state})

    def undo():
        if not was_enabled:
            model.gradient_checkpointing_disable()

    return CheckpointHandle("hf", [], [undo])

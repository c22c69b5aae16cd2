"""``torch.compile`` for the loop's model, through DeepSpeed's ``engine.compile()``.

DeepSpeed compiles the engine's module in place (``nn.Module.compile``): the module keeps
its parameters and their names, so checkpoints, consolidated weights and the final
safetensors carry no ``_orig_mod.`` prefix (``torch.compile(model)`` would wrap the model
and add one). The loop calls ``engine.compile()`` right after ``deepspeed.initialize``,
before a checkpoint is loaded or the first batch runs; compilation itself happens on the
first forward.

Where compilation cannot work, :func:`compile_problems` says so before the engine is built:
a Python that ``torch.compile`` does not support, Inductor on a CPU without a C++
compiler, Inductor on a GPU without Triton (or one too old for it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# torch.compile's keyword arguments that engine.compile() passes through (backend is its own).
COMPILE_KWARGS = ("mode", "fullgraph", "dynamic", "options")


def compile_requested(setting: bool | Mapping[str, Any] | None, config: Mapping[str, Any]) -> bool:
    """Whether the loop compiles: ``True`` or a mapping of options compile, ``False`` does not,
    and None follows the config (a ``"compile"`` section, DeepSpeed's settings for
    ``engine.compile()``, asks for it)."""
    if setting is None:
        return "compile" in config
    return setting is True or isinstance(setting, Mapping)


def setting_problems(setting: Any) -> list[str]:
    """Problems with the loop's ``compile`` argument itself."""
    if setting is None or isinstance(setting, bool):
        return []
    if not isinstance(setting, Mapping):
        return [f"compile: must be True, False, None (the config decides) or a dict of torch.compile options, "
                f"got {type(setting).__name__}"]
    unknown = sorted(set(setting) - {"backend", *COMPILE_KWARGS})
    if unknown:
        return [f"compile.{key}: unknown option; use backend, {', '.join(COMPILE_KWARGS)}" for key in unknown]
    return []


def compile_problems(device_type: str, backend: str | None) -> list[str]:
    """What stops ``torch.compile`` here, each with the fix (empty when nothing does).

    Args:
        device_type: the accelerator's device name ("cuda", "cpu", ...).
        backend: the compile backend; None or "inductor" is Inductor, the default.
    """
    problems = []
    try:
        from torch._dynamo.eval_frame import check_if_dynamo_supported

        check_if_dynamo_supported()
    except ImportError:  # another torch layout: torch.compile reports for itself
        pass
    except RuntimeError as e:
        problems.append(f"compile: torch.compile does not run here ({e}); train without compile=")
    if backend not in (None, "inductor"):
        return problems
    fallback = "or pass compile={\"backend\": \"aot_eager\"} (no code generation, no speed-up)"
    if device_type == "cpu":
        reason = missing_cpp_compiler()
        if reason:
            problems.append(f"compile: Inductor on a CPU builds C++ and found no compiler ({reason}); install one "
                            f"(e.g. apt-get install g++) or point CXX at it, {fallback}")
    elif device_type == "cuda" and not triton_available():
        problems.append(f"compile: Inductor on a GPU needs Triton and a GPU of compute capability 7.0 or newer; "
                        f"install the triton that matches torch {_torch_version()}, {fallback}")
    return problems


def run_problems(setting: bool | Mapping[str, Any] | None, config: Mapping[str, Any]) -> list[str]:
    """:func:`compile_problems` for this process's accelerator, when the run compiles."""
    if not compile_requested(setting, config):
        return []
    from deepspeed.accelerator import get_accelerator

    backend = setting.get("backend") if isinstance(setting, Mapping) else None
    return compile_problems(get_accelerator().device_name(), backend)


def missing_cpp_compiler() -> str | None:
    """Why Inductor finds no C++ compiler, or None when it finds one."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        return None
    try:
        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - Inductor's own error says what it looked for
        return f"{type(e).__name__}: {e}".strip()
    return None


def triton_available() -> bool:
    """Triton is importable and supports this GPU (torch's own check)."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return True  # another torch layout: torch.compile reports for itself
    return bool(has_triton())


def compile_engine(engine, setting: bool | Mapping[str, Any] | None) -> None:
    """``engine.compile()`` with the backend and torch.compile options of ``setting``."""
    options = dict(setting) if isinstance(setting, Mapping) else {}
    backend = options.pop("backend", None)
    if backend is None:
        from deepspeed.accelerator import get_accelerator

        backend = get_accelerator().get_compile_backend()
    engine.compile(backend=backend, compile_kwargs=options)


def _torch_version() -> str:
    import torch

    return torch.__version__

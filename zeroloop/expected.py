"""What a config value must be, read from the code that receives it.

DeepSpeed hands each config section to a constructor (``FusedAdam(params, **optimizer.params)``,
``WarmupLR(optimizer, **scheduler.params)``) or to one of its pydantic models. Both say what
they take: a signature's annotations and defaults, a model field's annotation and bounds.
:class:`Expected` is that, read once; :func:`value_problems` compares a JSON value with it and
says what to write instead.

Numbers written as strings (``"lr": "1e-3"``) are refused wherever the receiver does not take
a string: pydantic would convert them silently and a constructor would fail at the first step.
"""

from __future__ import annotations

import collections.abc
import enum
import inspect
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, replace
from typing import Any, Iterable

AUTO = "auto"
NUMERIC_STRING = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")
SEQUENCES = (list, tuple, set, frozenset, collections.abc.Iterable, collections.abc.Sequence,
             collections.abc.Collection)
MAPPINGS = (dict, collections.abc.Mapping)


@dataclass(frozen=True)
class Expected:
    """The JSON values one parameter or field accepts.

    Attributes:
        kinds: what it takes: "bool", "int" (a whole number, strictly), "whole" (a whole
            number, also written 1e9), "number", "str", "none", "list", "mapping",
            "callable", or "object:<Class>" (nothing a JSON file can hold). Empty: anything.
        choices: the allowed values of a ``Literal`` or an enum.
        length: the number of items of a fixed-length tuple.
        items: what each list item must be.
        bounds: ``(operator, limit)`` pairs from pydantic's ``ge``/``gt``/``le``/``lt``.
        model: a pydantic model the value (a JSON object) is checked against.
    """

    kinds: frozenset = frozenset()
    choices: tuple = ()
    length: int | None = None
    items: Expected | None = None
    bounds: tuple = ()
    model: type | None = None


ANYTHING = Expected()


def kinds(*names: str) -> Expected:
    return Expected(kinds=frozenset(names))


def merge(options: Iterable[Expected]) -> Expected:
    """What a ``Union`` of these accepts (anything, if one of them does)."""
    options = list(options)
    if not options or any(not o.kinds for o in options):
        return ANYTHING
    choices = sum((o.choices for o in options), ())
    pure_choices = all(o.choices or o.kinds <= {"none"} for o in options)
    lists = [o for o in options if "list" in o.kinds]
    return Expected(
        kinds=frozenset().union(*(o.kinds for o in options)),
        choices=choices if pure_choices else (),
        length=lists[0].length if len(lists) == 1 else None,
        items=next((o.items for o in lists if o.items is not None), None),
        model=next((o.model for o in options if o.model is not None), None),
    )


def from_annotation(annotation: Any, namespace: dict | None = None) -> Expected:
    """What a type annotation accepts from JSON (``ANYTHING`` where it cannot be told)."""
    if isinstance(annotation, str):
        annotation = evaluate(annotation, namespace)
    if annotation is inspect.Parameter.empty or annotation is Any:
        return ANYTHING
    if annotation is None or annotation is type(None):
        return kinds("none")
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return merge(from_annotation(a, namespace) for a in args)
    if origin is typing.Literal:
        return Expected(kinds=frozenset(json_kind(a) for a in args), choices=tuple(args))
    if origin is typing.Annotated:
        return from_annotation(args[0], namespace)
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return Expected(kinds=frozenset({"list"}), items=from_annotation(args[0], namespace))
        return Expected(kinds=frozenset({"list"}), length=len(args),
                        items=merge(from_annotation(a, namespace) for a in args))
    if origin in SEQUENCES or annotation in (list, tuple):
        items = from_annotation(args[0], namespace) if args else None
        return Expected(kinds=frozenset({"list"}), items=items)
    if origin in MAPPINGS or annotation in MAPPINGS:
        return kinds("mapping")
    if origin is collections.abc.Callable or annotation is collections.abc.Callable:
        return kinds("callable")
    return from_class(annotation)


def from_class(cls: Any) -> Expected:
    simple = {bool: "bool", int: "int", float: "number", str: "str"}
    if cls in simple:
        return kinds(simple[cls])
    if not isinstance(cls, type):
        return ANYTHING
    if issubclass(cls, enum.Enum):
        values = tuple(member.value for member in cls)
        return Expected(kinds=frozenset(json_kind(v) for v in values), choices=values)
    if hasattr(cls, "model_fields"):  # a pydantic model: a nested JSON object
        return Expected(kinds=frozenset({"mapping"}), model=cls)
    if issubclass(cls, (os.PathLike, str)):
        return kinds("str")
    if issubclass(cls, numbers.Integral):
        return kinds("int")
    if issubclass(cls, numbers.Real):
        return kinds("number")
    if cls.__module__.split(".")[0] in ("torch", "deepspeed"):  # a tensor, an optimizer...
        return kinds(f"object:{cls.__name__}")
    return ANYTHING


def evaluate(annotation: str, namespace: dict | None) -> Any:
    """A string annotation (``from __future__ import annotations``) as the object it names."""
    scope = {**vars(typing), **vars(collections.abc), **(namespace or {})}
    try:
        return eval(annotation, scope)  # noqa: S307 - annotations of installed libraries
    except Exception:
        return Any


def from_default(default: Any) -> Expected:
    """What an unannotated parameter takes, judged by its default (lenient: ``0`` is a number)."""
    if default is inspect.Parameter.empty or default is None:
        return ANYTHING
    if isinstance(default, bool):
        return kinds("bool")
    if isinstance(default, numbers.Real):
        return kinds("number")
    if isinstance(default, str):
        return kinds("str")
    if isinstance(default, (tuple, list)) and default and all(is_number(v) for v in default):
        return Expected(kinds=frozenset({"list"}), items=kinds("number"),
                        length=len(default) if isinstance(default, tuple) else None)
    return ANYTHING


def from_parameter(parameter: inspect.Parameter, namespace: dict | None = None) -> Expected:
    """What a constructor parameter takes: its annotation, else its default's type."""
    if parameter.annotation is inspect.Parameter.empty:
        return from_default(parameter.default)
    expected = from_annotation(parameter.annotation, namespace)
    if parameter.default is None and expected.kinds:  # `x: float = None` takes null too
        expected = replace(expected, kinds=expected.kinds | {"none"})
    return expected


def from_field(field: Any) -> Expected:
    """What a pydantic field takes: its annotation, bounds, and integers written as 1e9."""
    expected = from_annotation(field.annotation)
    if "int" in expected.kinds:  # pydantic takes 1e9 (a JSON float) for an int
        expected = replace(expected, kinds=(expected.kinds - {"int"}) | {"whole"})
    bounds = tuple((op, getattr(m, op)) for m in field.metadata for op in ("ge", "gt", "le", "lt")
                   if getattr(m, op, None) is not None)
    return replace(expected, bounds=bounds)


# --- comparing a value with what is expected ------------------------------------------------------


def value_problems(key: str, value: Any, expected: Expected) -> list[str]:
    """Why ``value`` does not fit ``expected``, as ``"key: ..."`` lines (none if it fits)."""
    if isinstance(value, str) and value == AUTO:
        return []  # resolved (or reported) by zeroloop.config
    if not expected.kinds:
        return [numeric_string(key, value)] if is_numeric_string(value) else []
    if not accepts(expected, value):
        return [f"{key}: must be {describe(expected)}, got {value!r}{hint(expected, value)}"]
    if expected.choices and value not in expected.choices and not (value is None and "none" in expected.kinds):
        return [f"{key}: must be one of {', '.join(repr(c) for c in expected.choices)}, got {value!r}"]
    if is_number(value):
        return [f"{key}: must be {BOUND_TEXT[op]} {limit}, got {value!r}" for op, limit in expected.bounds
                if not BOUND_CHECKS[op](value, limit)]
    if isinstance(value, (list, tuple)) and "list" in expected.kinds:
        return list_problems(key, value, expected)
    return []


def list_problems(key: str, value: list, expected: Expected) -> list[str]:
    if expected.length is not None and len(value) != expected.length:
        return [f"{key}: must be {describe(expected)}, got {len(value)} value{'s' * (len(value) != 1)} "
                f"({value!r})"]
    problems = []
    for i, item in enumerate(value):
        problems += value_problems(f"{key}[{i}]", item, expected.items or ANYTHING)
    return problems


def accepts(expected: Expected, value: Any) -> bool:
    allowed = expected.kinds
    if value is None:
        return "none" in allowed
    if isinstance(value, bool):
        return "bool" in allowed
    if isinstance(value, numbers.Integral):
        return bool(allowed & {"int", "whole", "number"})
    if isinstance(value, numbers.Real):
        return "number" in allowed or ("whole" in allowed and float(value).is_integer())
    if isinstance(value, str):
        return "str" in allowed
    if isinstance(value, (list, tuple)):
        return "list" in allowed
    if isinstance(value, collections.abc.Mapping):
        return "mapping" in allowed
    return "callable" in allowed and callable(value)


KIND_TEXT = {"bool": "true or false", "int": "a whole number", "whole": "a whole number",
             "number": "a number", "str": "a string", "none": "null", "mapping": "a JSON object",
             "callable": "a function (which a JSON config cannot hold: pass it to the loop in Python)"}
PLURAL_TEXT = {"a whole number": "whole numbers", "a number": "numbers", "a string": "strings",
               "true or false": "booleans"}
BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
BOUND_CHECKS = {"ge": lambda v, x: v >= x, "gt": lambda v, x: v > x, "le": lambda v, x: v <= x,
                "lt": lambda v, x: v < x}


def describe(expected: Expected) -> str:
    """``"a number or null"``, ``"a list of 2 numbers"``, ``"one of 'min', 'max'"``..."""
    if expected.choices:
        return "one of " + ", ".join(repr(c) for c in expected.choices)
    parts = []
    shown = [k for k in expected.kinds if not k.startswith("object:") and k != "callable"] or expected.kinds
    for kind in sorted(shown, key=kind_rank):  # what a JSON file can hold, when it can hold something
        if kind == "list":
            parts.append(describe_list(expected))
        elif kind.startswith("object:"):
            parts.append(f"a {kind[7:]} object (which a JSON config cannot hold: pass it in Python)")
        elif KIND_TEXT[kind] not in parts and not (kind == "whole" and "a whole number" in parts):
            parts.append(KIND_TEXT[kind])
    if "a number" in parts and "a whole number" in parts:
        parts.remove("a whole number")
    return " or ".join(parts)


KIND_ORDER = ("bool", "int", "whole", "number", "str", "list", "mapping", "callable", "none")


def kind_rank(kind: str) -> int:
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER) - 1


def describe_list(expected: Expected) -> str:
    items = describe(expected.items) if expected.items is not None and expected.items.kinds else ""
    items = PLURAL_TEXT.get(items, f"values ({items})" if items else "values")
    count = f"{expected.length} " if expected.length is not None else ""
    return f"a list of {count}{items}"


def hint(expected: Expected, value: Any) -> str:
    if is_numeric_string(value):
        return f"; write {value.strip()} without quotes"
    if isinstance(value, float) and value.is_integer() and "int" in expected.kinds:
        return f"; write {int(value)}"
    return ""


def numeric_string(key: str, value: str) -> str:
    return f"{key}: a number written as a string ({value!r}); write {value.strip()} without quotes"


def is_numeric_string(value: Any) -> bool:
    return isinstance(value, str) and bool(NUMERIC_STRING.match(value))


def json_kind(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "number"
    return "str"


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to ``name`` (case-insensitive), or None."""
    import difflib

    by_lower = {c.lower(): c for c in candidates}
    guess = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[guess[0]] if guess else None

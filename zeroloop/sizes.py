"""Sizes and counts as people write them: "24GB", "80GiB", "7B", and bytes printed back.

Units: GB = 1e9 bytes, GiB = 2**30 bytes; a count's B (billion) and G are 1e9.
"""

from __future__ import annotations

import re
from typing import Any

from .config import is_number

GB = 10**9
GiB = 2**30

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: Any) -> int:
    """Bytes from a number of bytes or a size such as ``"24GB"`` (1e9) or ``"80GiB"`` (2^30).

    Raises:
        ValueError: the value is neither, with an example of what is accepted.
    """
    if is_number(value):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).upper() if match else None
    if unit not in SIZE_UNITS:
        raise ValueError(f"cannot read {value!r} as a size; write bytes or a size such as 24GB "
                         "(GB = 1e9 bytes) or 80GiB (GiB = 2^30 bytes)")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


COUNT_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text: Any) -> Any:
    """A count from the command line: ``"7e9"``, ``"7B"``, ``"350M"`` -> a float; anything
    else is returned as given, for the validation to name."""
    if text is None or is_number(text):
        return text
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not match:
        return text
    try:
        return float(match.group(1)) * COUNT_SUFFIXES.get(match.group(2).upper(), 1)
    except ValueError:
        return text


def human(n: float | None) -> str:
    """Bytes as GB (1e9) or MB (1e6), three significant figures."""
    if n is None:
        return "-"
    if abs(n) >= 0.1 * GB:
        return f"{n / GB:.3g} GB" if n < 1000 * GB else f"{n / GB:,.0f} GB"
    return f"{n / 10**6:.3g} MB"

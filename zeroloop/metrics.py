"""What people see during a run: a progress bar and ``metrics.jsonl``, both on rank 0 only."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from tqdm.auto import tqdm


class ProgressBar:
    """A tqdm bar over optimizer steps on rank 0; does nothing on other ranks.

    Args:
        total: optimizer steps in the run, or None when unknown.
        initial: steps already done (a resumed run).
        enabled: False on ranks other than 0, or when the user turned it off.
    """

    def __init__(self, total: int | None, initial: int = 0, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                        desc="train") if enabled else None

    def update(self, steps: int, metrics: dict[str, Any] | None = None) -> None:
        if self.bar is None:
            return
        if metrics:
            self.bar.set_postfix(format_postfix(metrics), refresh=False)
        self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_postfix(metrics: dict[str, Any]) -> dict[str, str]:
    shown = {}
    if metrics.get("loss") is not None:
        shown["loss"] = f"{metrics['loss']:.4f}"
    if metrics.get("lr") is not None:
        shown["lr"] = f"{metrics['lr']:.2e}"
    if metrics.get("samples_per_sec") is not None:
        shown["samples/s"] = f"{metrics['samples_per_sec']:.1f}"
    return shown


class MetricsLog:
    """Appends one JSON object per logged step to ``path`` (rank 0 only).

    Non-finite floats are written as null so every line stays valid JSON.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = os.fspath(path)
        self.file = None
        if enabled:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({k: json_safe(v) for k, v in record.items()}) + "\n")
        self.file.flush()

    def drop_after(self, step: int) -> None:
        """Remove the records of steps after ``step`` (a resumed run trains them again, so each
        step stays in the file once). Rewritten through a temporary file and ``os.replace``."""
        if self.file is None:
            return
        self.file.close()
        with open(self.path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

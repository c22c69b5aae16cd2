"""What people see during a run: a progress bar and ``metrics.jsonl``, both on rank 0 only.

The same progress bar counts the bytes :func:`zeroloop.consolidate` and the final-weights
export write."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from tqdm.auto import tqdm


class ProgressBar:
    """A tqdm bar over optimizer steps on rank 0 (or over bytes written: :meth:`over_bytes`);
    does nothing when disabled. A context manager that closes the bar on exit.

    Args:
        total: optimizer steps in the run, or None when unknown.
        initial: steps already done (a resumed run).
        enabled: False on ranks other than 0, or when the user turned it off.
    """

    def __init__(self, total: int | None, initial: int = 0, enabled: bool = True, **tqdm_args: Any):
        tqdm_args = {"unit": "step", "desc": "train", **tqdm_args}
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, **tqdm_args) if enabled else None

    @classmethod
    def over_bytes(cls, total_bytes: int, desc: str, enabled: bool = True) -> "ProgressBar":
        """A bar over ``total_bytes`` bytes, shown in KiB/MiB/GiB (powers of 1024)."""
        return cls(total_bytes, enabled=enabled, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

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


class CustomMetrics:
    """Values given to :meth:`~zeroloop.TrainerLoop.log_metrics` since the last logging step.

    Each name keeps a sum and a count, so a value logged on every micro-step is reported as
    its mean over the window. Names logged with ``mean_over_ranks`` are averaged over ranks
    when the window is reduced (one all-reduce for all of them); the others are rank 0's.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.over_ranks: set[str] = set()

    def add(self, metrics: dict[str, Any], mean_over_ranks: bool) -> None:
        """Add one value per name (numbers, or 0-d tensors, read with ``.item()``).

        Raises:
            TypeError: a value that is not a number.
            ValueError: a name used before with the other ``mean_over_ranks``.
        """
        for name, value in metrics.items():
            value = value.item() if hasattr(value, "item") else value
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"log_metrics: {name!r} must be a number or a one-element tensor, got "
                                f"{type(value).__name__}")
            if name in self.counts and (name in self.over_ranks) != mean_over_ranks:
                raise ValueError(f"log_metrics: {name!r} was logged with mean_over_ranks="
                                 f"{not mean_over_ranks} earlier in this window; use one setting per name")
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.counts[name] = self.counts.get(name, 0) + 1
            if mean_over_ranks:
                self.over_ranks.add(name)

    def reduce(self, device: Any) -> dict[str, float]:
        """The window's mean per name (over ranks too where asked), then an empty window.

        Collective when any name was logged with ``mean_over_ranks``: every rank must have
        logged the same such names in this window.
        """
        means = {name: self.sums[name] / self.counts[name] for name in self.sums}
        shared = sorted(self.over_ranks)
        if shared:
            import deepspeed.comm as dist
            import torch

            stats = torch.tensor([self.sums[n] for n in shared] + [self.counts[n] for n in shared],
                                 dtype=torch.float64, device=device)
            dist.all_reduce(stats)
            sums, counts = stats[:len(shared)].tolist(), stats[len(shared):].tolist()
            means.update({name: s / c for name, s, c in zip(shared, sums, counts)})
        self.reset()
        return means

"""zeroloop's metrics in DeepSpeed's monitors: TensorBoard, CSV, Weights & Biases, Comet.

The config's ``tensorboard``, ``csv_monitor``, ``wandb`` and ``comet`` sections stay
DeepSpeed's: the engine builds its ``MonitorMaster`` (``engine.monitor``) from them and
writes the learning rate (and under fp16 the loss scale) there after every optimizer step.
zeroloop writes the rest through the same ``engine.monitor``, on rank 0, at the logging
cadence: the training loss, grad norm, samples/s, tokens/s, skipped steps, the custom
metrics of :meth:`~zeroloop.TrainerLoop.log_metrics` and, after each evaluation, the
eval loss.

Every event follows DeepSpeed's convention: the label ``Train/Samples/<name>`` and the
x-axis the engine's ``global_samples`` (samples over all ranks so far), so that zeroloop's
series and DeepSpeed's share one monotonic axis (W&B and Comet need one).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

# Config section -> (the package its DeepSpeed monitor imports, zeroloop's extra that installs it).
MONITOR_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "comet": ("comet_ml", "comet"),
    "csv_monitor": (None, None),  # the standard library's csv
}
# What DeepSpeed already writes after every step, so zeroloop does not write it again.
WRITTEN_BY_DEEPSPEED = ("lr", "loss_scale")
# Record keys that are positions or flags, not series.
NOT_SERIES = ("step", "epoch", "overflow")
LABELS = {"loss": "train_loss"}  # DeepSpeed's name for the training loss


def enabled_sections(config: Mapping[str, Any]) -> list[str]:
    """The monitor sections of ``config`` with ``"enabled": true``."""
    return [name for name in MONITOR_PACKAGES
            if isinstance(config.get(name), Mapping) and config[name].get("enabled") is True]


def missing_package_problems(config: Mapping[str, Any]) -> list[str]:
    """One problem per enabled monitor whose package is not installed, naming the extra.

    DeepSpeed would fail inside ``deepspeed.initialize`` (after the process group and the
    model are set up); this check runs before.
    """
    problems = []
    for section in enabled_sections(config):
        package, extra = MONITOR_PACKAGES[section]
        if package is not None and importlib.util.find_spec(package) is None:
            problems.append(f"{section}.enabled: the {section} monitor needs the {package} package, which is not "
                            f"installed: pip install \"zeroloop[{extra}]\" (or set {section}.enabled to false)")
    return problems


def with_output_paths(config: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """Put the files of the TensorBoard and CSV monitors under ``output_dir`` when the config
    names no ``output_path`` (DeepSpeed's default is the current directory).

    Returns:
        ``config`` itself, changed in place.
    """
    for section in ("tensorboard", "csv_monitor"):
        if section in enabled_sections(config) and not config[section].get("output_path"):
            config[section]["output_path"] = os.path.join(output_dir, section)
    return config


def monitor_events(record: Mapping[str, Any], samples: int) -> list[tuple[str, float, int]]:
    """DeepSpeed monitor events ``(label, value, global_samples)`` for one metrics record:
    every finite number except what DeepSpeed writes itself and the position keys."""
    events = []
    for key, value in record.items():
        if key in WRITTEN_BY_DEEPSPEED or key in NOT_SERIES or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            events.append((f"Train/Samples/{LABELS.get(key, key)}", float(value), int(samples)))
    return events


class MonitorFeed:
    """Writes metrics records to the engine's ``MonitorMaster`` on rank 0; does nothing
    when the config enables no monitor or on other ranks.

    Args:
        engine: the DeepSpeed engine (its ``monitor`` and ``global_samples``).
        rank: this process's rank.
    """

    def __init__(self, engine, rank: int):
        self.engine = engine
        monitor = getattr(engine, "monitor", None)
        self.monitor = monitor if rank == 0 and getattr(monitor, "enabled", False) else None

    @property
    def enabled(self) -> bool:
        return self.monitor is not None

    def write(self, record: Mapping[str, Any]) -> None:
        """Send one record (a logging step's metrics, or an evaluation's)."""
        if self.monitor is None:
            return
        events = monitor_events(record, getattr(self.engine, "global_samples", 0))
        if events:
            self.monitor.write_events(events)

"""Only messages that tell the user something: each once, not once per rank.

- zeroloop's own log: INFO lines ("checkpoint saved", "resumed from") come from rank 0
  only; warnings and errors from every rank (they may be about that rank).
- DeepSpeed's logger: a message it prints although nothing is wrong is dropped (its
  warm-up schedulers ask for their own learning rate inside their constructor and warn
  that they have not started); its accelerator notice ("Setting accelerator to CPU")
  is kept on rank 0 only.
- Warnings: torch deprecated ``all_gather_into_tensor`` and ``reduce_scatter_tensor``,
  which DeepSpeed's ZeRO calls on every step; the FutureWarning says nothing a user can
  act on and, re-armed whenever a library touches the warning filters, repeated on every
  ZeRO-3 step and broke the progress bar. Only those two messages are ignored.

:func:`install` runs when zeroloop is imported, before DeepSpeed is (the accelerator notice
is logged at ``import deepspeed``), and is idempotent.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# DeepSpeed messages that say nothing to the user, on every rank.
DEEPSPEED_NOISE = (
    re.compile(r"^Attempting to get learning rate from scheduler before it has started"),
)
# DeepSpeed messages every rank prints alike: kept on rank 0.
DEEPSPEED_RANK_ZERO_ONLY = (
    re.compile(r"^Setting accelerator to CPU"),
)
DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def _rank() -> int:
    return int(os.environ.get("RANK", 0))  # set by every launcher before the script starts


class RankZeroInfo(logging.Filter):
    """INFO and below from rank 0 only; warnings and errors from every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _rank() == 0


class DeepSpeedNoise(logging.Filter):
    """Drops :data:`DEEPSPEED_NOISE`, and :data:`DEEPSPEED_RANK_ZERO_ONLY` on other ranks."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(pattern.search(message) for pattern in DEEPSPEED_NOISE):
            return False
        return _rank() == 0 or not any(pattern.search(message) for pattern in DEEPSPEED_RANK_ZERO_ONLY)


def _add_once(logger: logging.Logger, filter_class: type[logging.Filter]) -> None:
    if not any(isinstance(f, filter_class) for f in logger.filters):
        logger.addFilter(filter_class())


def install() -> None:
    """Install the filters above (idempotent)."""
    _add_once(logging.getLogger("zeroloop"), RankZeroInfo)
    _add_once(logging.getLogger("DeepSpeed"), DeepSpeedNoise)  # the logger deepspeed.utils.logger configures
    warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVES, category=FutureWarning)

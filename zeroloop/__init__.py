"""zeroloop: a DeepSpeed training loop that is boring.

``TrainerLoop`` builds a DeepSpeed engine from a config dict or JSON file and runs the
``engine.backward`` / ``engine.step`` loop with what real runs need around it.
"""

from .version import __version__
from . import quiet  # noqa: E402 - before anything imports deepspeed (its import logs)

quiet.install()

from .activation import ActivationCheckpointing  # noqa: E402
from .checkpoint import CheckpointSettings  # noqa: E402
from .config import Hyperparameters, resolve_config  # noqa: E402
from .consolidation import consolidate  # noqa: E402
from .data import PerRankBatches  # noqa: E402
from .errors import CheckpointError, ConfigError, NumericalHealthError, ZeroloopError  # noqa: E402
from .loop import TrainerLoop  # noqa: E402
from .memory import plan  # noqa: E402
from .precision import HealthPolicy  # noqa: E402
from .runtime import init_distributed, seed_everything, teardown  # noqa: E402
from .state import TrainState  # noqa: E402
from .summary import LogSettings, TrainSummary  # noqa: E402

__all__ = [
    "ActivationCheckpointing",
    "CheckpointError",
    "CheckpointSettings",
    "ConfigError",
    "HealthPolicy",
    "Hyperparameters",
    "LogSettings",
    "NumericalHealthError",
    "PerRankBatches",
    "TrainState",
    "TrainSummary",
    "TrainerLoop",
    "ZeroloopError",
    "__version__",
    "consolidate",
    "init_distributed",
    "plan",
    "resolve_config",
    "seed_everything",
    "teardown",
]

"""zeroloop: a DeepSpeed training loop that is boring.

``TrainerLoop`` builds a DeepSpeed engine from a config dict or JSON file and runs the
``engine.backward`` / ``engine.step`` loop with what real runs need around it.
"""

__version__ = "0.1.0"

from .activation import ActivationCheckpointing  # noqa: E402
from .config import ConfigError, Hyperparameters, resolve_config  # noqa: E402
from .loop import LogSettings, TrainerLoop, TrainSummary  # noqa: E402
from .runtime import seed_everything  # noqa: E402

__all__ = [
    "ActivationCheckpointing",
    "ConfigError",
    "Hyperparameters",
    "LogSettings",
    "TrainSummary",
    "TrainerLoop",
    "__version__",
    "resolve_config",
    "seed_everything",
]

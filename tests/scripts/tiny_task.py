"""What the launcher test scripts share: their command line and the tiny regression they train.

The scripts run as ``python tests/scripts/<name>.py`` (directly or under a launcher), so this
module is imported from the script's own folder.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import TensorDataset

from zeroloop import seed_everything


def script_arguments(*options: tuple[str, dict]) -> argparse.Namespace:
    """Parse ``--out`` (required) and each ``(flag, add_argument keywords)`` option.

    Args:
        options: the script's own options.

    Returns:
        The parsed arguments; the launcher's own (``--local_rank``) are left unparsed.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    for flag, keywords in options:
        parser.add_argument(flag, **keywords)
    args, _ = parser.parse_known_args()  # the deepspeed launcher adds --local_rank
    return args


def tiny_regression() -> tuple[nn.Module, TensorDataset]:
    """Seed everything with 0, then: 64 samples of 8 features whose target is their sum, and a
    two-layer MLP for them (the same on every rank and every run).

    Returns:
        ``(model, data)``.
    """
    seed_everything(0)
    x = torch.randn(64, 8)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True))
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    return model, data

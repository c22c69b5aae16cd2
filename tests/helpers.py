"""Small models, data and autograd functions shared by zeroloop's own tests (module-level, so ranks can
pickle them)."""

import torch
from torch import nn
from torch.utils.data import Dataset


class RegressionData(Dataset):
    """A fixed random linear-regression set: dicts of float inputs and targets."""

    def __init__(self, n: int = 64, dim: int = 8, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class MLPRegressor(nn.Module):
    """Returns the mean squared error as a scalar tensor when given targets."""

    def __init__(self, dim: int = 8, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x, y=None):
        out = self.net(x)
        return out if y is None else nn.functional.mse_loss(out.float(), y.float())


class GradBomb(torch.autograd.Function):
    """Identity forward; infinite gradients backward (an injected fp16 overflow)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def make_model(seed: int = 0, **kwargs) -> MLPRegressor:
    torch.manual_seed(seed)
    return MLPRegressor(**kwargs)

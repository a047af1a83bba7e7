"""The architecture of the session's trained MLP (tests/conftest.py), as a factory a model
directory can rebuild it from."""

from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))

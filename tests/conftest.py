"""Shared fixtures: small real models trained once per session on the embedded MNIST slice."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch loads OpenMP: idle threads sleep instead of spinning. On a shared or small machine
# spinning threads made the suite 10-25x slower with 2 threads than with 1 (tests/training).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advx.data import load

os.environ.setdefault("ADVX_PROGRESS", "0")
# Under pytest-xdist (`pytest -n auto`, the README's command) each worker is a process of its
# own: one thread each, so that the workers share the cores instead of oversubscribing them.
torch.set_num_threads(1 if "PYTEST_XDIST_WORKER" in os.environ else min(2, torch.get_num_threads()))


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core available to this process, at most 4 (each worker imports
    torch and trains the session's small models once; beyond 4 that costs more than it saves)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


SHARED = Path(__file__).resolve().parents[1].parent / "shared"


class CountingNet(nn.Module):
    """Wraps a net and counts the rows of every forward and backward pass through it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.forward_rows = 0
        self.backward_rows = 0

    def reset(self) -> None:
        self.forward_rows = 0
        self.backward_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_rows += x.shape[0]
        if x.requires_grad:
            x = _CountBackward.apply(x, self)
        return self.net(x)


class _CountBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, owner):
        ctx.owner = owner
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.owner.backward_rows += grad.shape[0]
        return grad, None


@pytest.fixture(autouse=True, scope="session")
def _private_state_directory(tmp_path_factory):
    """advx serve and advx review default to a store under $XDG_STATE_HOME: keep the tests' own
    (and their subprocesses', which inherit the environment) out of the user's."""
    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if old is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = old


@pytest.fixture(autouse=True)
def _logging_left_as_found():
    """A CLI command run in-process (CliRunner) configures logging for its process: advx serve
    gives advx.guard and uvicorn their own JSON handler and stops them propagating. Left in
    place, that hides later tests' records from caplog, so each test gets the loggers back as
    it found them."""
    import logging

    names = ("", "advx", "advx.guard", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {}
    for name in names:
        lg = logging.getLogger(name)
        saved[name] = (list(lg.handlers), lg.level, lg.propagate, lg.disabled)
    yield
    for name, (handlers, level, propagate, disabled) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
        lg.disabled = disabled


@pytest.fixture(autouse=True, scope="session")
def _reports_match_their_schema():
    """Every audit report a test serializes (to_dict, hence save, to_json and the CLI's output)
    is validated against the published JSON Schema."""
    import jsonschema

    from advx.audit.report import Report, json_schema

    validator = jsonschema.Draft202012Validator(json_schema())
    to_dict = Report.to_dict

    def validated(self: Report) -> dict:
        doc = to_dict(self)
        validator.validate(doc)
        return doc

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Report, "to_dict", validated)
        yield


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="session")
def mnist_train():
    return load("mnist-demo", split="train")


@pytest.fixture(scope="session")
def mnist_test():
    return load("mnist-demo", split="test")


@pytest.fixture(scope="session")
def trained_mlp(mnist_train) -> nn.Module:
    """A small undefended MLP (about 93% clean accuracy), trained in about a second.

    A plain loop, so that the attack, defense and audit tests do not depend on advx.training;
    it gives bit for bit the weights of ``fit(net, x, y, epochs=3, batch_size=64, lr=3e-3,
    seed=0)``: the same order per epoch (a permutation seeded with the epoch, as the one-process
    sampler draws it), Adam, and the mean loss as fit computes it (sum over the batch / its size).
    """
    x, y = mnist_train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = _mlp()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for epoch in range(3):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for idx in order.split(64):
            loss = F.cross_entropy(net(x[idx]), y[idx], reduction="none").sum() * (1 / len(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture()
def batch(mnist_test, trained_mlp):
    """32 correctly classified test digits."""
    x, y = mnist_test
    with torch.no_grad():
        ok = trained_mlp(x).argmax(1) == y
    return x[ok][:32].clone(), y[ok][:32].clone()


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's ../shared folder)")
    return path

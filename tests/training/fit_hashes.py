"""The weights a few fit configurations give, as sha256 digests: a record to compare a refactor of
the fit loop against (no behaviour change means the same digests on the same machine).

    python tests/training/fit_hashes.py            # prints the digests as JSON
    python tests/training/fit_hashes.py --write    # records them in fit_hashes.json

One thread, so that the float reductions run in one order; the digests of another torch build
or another CPU may differ (test_fit_hashes.py compares only on the recorded environment).
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import advx
from advx._io import sha256_bytes, sha256_tensors
from advx.data import load
from advx.training import (
    Checkpointing,
    Monitor,
    Precision,
    Recipe,
    Schedule,
    fgsm_rs,
    fit,
    trades,
)
from advx.zoo import build

RECORD = Path(__file__).with_name("fit_hashes.json")


class Interrupted(Exception):
    pass


def _mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def _lenet(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build("lenet", width=4)


def _killed_at(recipe: Recipe, epoch: int) -> Recipe:
    def run(b):
        if b.epoch == epoch:
            raise Interrupted
        return recipe(b)

    return Recipe(recipe.name, recipe.params, run, recipe.threat, recipe.overfit_check)


def _digest(net: nn.Module, history: Any) -> dict[str, str]:
    state = net.state_dict()
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in history.epochs]
    extra = {"stopped": history.stopped, "best_epoch": history.best_epoch}
    return {
        "weights": sha256_tensors(*(state[k] for k in sorted(state))),
        "history": sha256_bytes(json.dumps([rows, extra], sort_keys=True).encode()),
    }


FGSM_KW: dict[str, Any] = dict(
    batch_size=50,
    schedule=Schedule(epochs=3, lr=5e-3, lr_schedule="cyclic"),
    seed=1,
    progress=False,
    monitor=Monitor(data=40),
)


def _standard(x, y, tmp: Path) -> dict[str, str]:
    net = _mlp()
    h = fit(net, x, y, schedule=Schedule(epochs=2, lr=3e-3), batch_size=64, seed=0, progress=False)
    return _digest(net, h)


def _fgsm_rs_cyclic(x, y, tmp: Path) -> dict[str, str]:
    net = _lenet()
    h = fit(net, x, y, loss=fgsm_rs(0.1), **FGSM_KW)
    return _digest(net, h)


def _trades_sgd_multistep(x, y, tmp: Path) -> dict[str, str]:
    net = _mlp()
    schedule = Schedule(
        epochs=2,
        lr=0.05,
        optimizer="sgd",
        momentum=0.5,
        weight_decay=1e-4,
        lr_schedule="multistep",
        milestones=(1,),
    )
    h = fit(
        net,
        x[:300],
        y[:300],
        loss=trades(0.1, steps=3),
        schedule=schedule,
        batch_size=50,
        seed=2,
        progress=False,
        monitor=Monitor(data=30, steps=3),
    )
    return _digest(net, h)


def _resume(x, y, tmp: Path) -> dict[str, str]:
    """fgsm-rs, killed after epoch 2 and resumed: the same digests as _fgsm_rs_cyclic."""
    out = tmp / "resume"
    try:
        fit(_lenet(), x, y, loss=_killed_at(fgsm_rs(0.1), 2), checkpoint=out, **FGSM_KW)
    except Interrupted:
        pass
    net = _lenet(seed=99)
    h = fit(net, x, y, loss=fgsm_rs(0.1), checkpoint=Checkpointing(out, resume=True), **FGSM_KW)
    return _digest(net, h)


def _classifier_bf16_overfit(x, y, tmp: Path) -> dict[str, str]:
    """A Classifier with normalization, bf16 autocast, a monitor and a tight overfitting check
    that rolls back to epoch 3 and stops at epoch 5."""
    clf = advx.Classifier(_mlp(), mean=(0.1307,), std=(0.3081,))
    h = fit(
        clf,
        x[:400],
        y[:400],
        loss=fgsm_rs(0.2),
        schedule=Schedule(epochs=6, lr=1e-2),
        batch_size=40,
        seed=3,
        precision=Precision(autocast=torch.bfloat16),
        progress=False,
        monitor=Monitor(data=40, overfit_drop=0.01),
    )
    assert h.stopped and h.best_epoch == 3, h.stopped  # the roll-back is part of what is recorded
    return _digest(clf.net, h)


def _plain_loss(x, y, tmp: Path) -> dict[str, str]:
    net = _mlp()
    h = fit(
        net,
        x[:300],
        y[:300],
        loss=lambda m, xb, yb: torch.nn.functional.cross_entropy(m(xb), yb),
        schedule=Schedule(lr=3e-3),
        batch_size=64,
        seed=0,
        progress=False,
    )
    return _digest(net, h)


CONFIGS: dict[str, Callable[..., dict[str, str]]] = {
    "standard": _standard,
    "fgsm_rs_cyclic": _fgsm_rs_cyclic,
    "trades_sgd_multistep": _trades_sgd_multistep,
    "resume": _resume,
    "classifier_bf16_overfit": _classifier_bf16_overfit,
    "plain_loss": _plain_loss,
}


def environment() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": "1",
    }


def run_all() -> dict[str, dict[str, str]]:
    x, y = load("mnist-demo", split="train")
    x, y = x[:500], y[:500]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return {name: make(x, y, Path(tmp)) for name, make in CONFIGS.items()}
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    doc = {"environment": environment(), "digests": run_all()}
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    if "--write" in sys.argv:
        RECORD.write_text(text)
    sys.stdout.write(text)

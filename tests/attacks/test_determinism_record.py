"""A record of per-sample results, made before the speed work of issue 15, that the code must keep.

The record (``data/determinism_record.pt``) holds a small CNN's weights and, for 40 MNIST test
points, the per-sample verdicts, distances and forward/backward pass counts of APGD (CE and
APGD-T), Square (Linf and L2), FAB (untargeted and FAB-T), PGD (Linf and L2), and the stage that
broke each point in a ``fast`` audit. The tests rerun them at batch sizes 1, 37 and 40 (the whole
set) and compare with the record: the same verdicts and pass counts, distances within float
tolerance. A change that makes an attack faster must not change what it finds.

Regenerate (only when a change of results is intended, and say why in the commit):

    python tests/attacks/test_determinism_record.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import advx
from advx.data import load

RECORD = Path(__file__).parent / "data" / "determinism_record.pt"
N = 40
EPS = 0.1
EPS_L2 = 1.5
BATCHES = (1, 37, N)
pytestmark = pytest.mark.filterwarnings("ignore:the model was in training mode")


def _net() -> nn.Module:
    # 28x28 -> 12x12 -> 4x4: small enough to store, strong enough to need real attacks
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 5, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def _attacks() -> dict[str, advx.Attack]:
    linf, l2 = advx.Linf(EPS), advx.L2(EPS_L2)
    return {
        "apgd-ce": advx.APGD(linf, loss="ce", steps=20, seed=3),
        "apgd-t": advx.APGD(linf, loss="dlr-targeted", steps=20, targets=3, seed=4),
        "apgd-l2": advx.APGD(l2, loss="ce", steps=20, restarts=2, seed=5),
        "square-linf": advx.Square(linf, queries=300, seed=6),
        "square-l2": advx.Square(l2, queries=300, restarts=2, seed=7),
        "fab": advx.FAB(linf, steps=15, seed=8),
        "fab-t": advx.FAB(linf, steps=15, targeted=True, targets=3, seed=9),
        "pgd": advx.PGD(linf, steps=10, seed=10),
        "pgd-l2": advx.PGD(l2, steps=10, restarts=2, seed=11),
    }


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load("mnist-demo", split="test")
    return x[:N], y[:N]


def _trained() -> nn.Module:
    """One epoch of Adam on the embedded training slice (only when the record is written)."""
    x, y = load("mnist-demo", split="train")
    torch.manual_seed(0)
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    for b in range(0, len(x), 64):
        i = order[b : b + 64]
        loss = nn.functional.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _split(n: int, batch: int) -> list[torch.Tensor]:
    return [torch.arange(b, min(b + batch, n)) for b in range(0, n, batch)]


def _run_attack(
    attack: advx.Attack, clf: advx.Classifier, x: torch.Tensor, y: torch.Tensor, batch: int
) -> dict[str, torch.Tensor]:
    """Per-sample results of ``attack`` on (x, y), run ``batch`` samples at a time with their
    global indices."""
    parts = []
    for rows in _split(len(x), batch):
        r = attack(clf, x[rows], y[rows], index=rows)
        parts.append((r.success, r.distance.double(), r.queries, r.grads))
    return {
        key: torch.cat([p[i] for p in parts])
        for i, key in enumerate(("success", "distance", "queries", "grads"))
    }


def _run_audit(clf: advx.Classifier, x: torch.Tensor, y: torch.Tensor, batch: int) -> dict:
    report = advx.audit(
        clf,
        x,
        y,
        advx.Linf(EPS),
        suite="fast",
        seed=1,
        eps_curve=None,
        checks=False,
        batch_size=batch,
    )
    assert report is not None
    doc = report.to_dict()
    return {"robust_accuracy": doc["robust_accuracy"], "clean_accuracy": doc["clean_accuracy"]}


def _broken_by(clf: advx.Classifier, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
    """Per sample: the stage of the ``fast`` cascade that broke it (-1: robust; -2: clean
    misclassified), from the cascade runner the audit uses."""
    from advx.audit.runner import run_cascade
    from advx.audit.suites import SUITES

    staged = SUITES["fast"].stages(advx.Linf(EPS), seed=1)
    st = run_cascade(
        clf,
        x,
        y,
        [a for a, _ in staged],
        batch_size=batch,
        closest=[c for _, c in staged],
    )
    out = st.broken_by.clone()
    out[~st.clean_correct] = -2
    return out


def _write() -> None:
    torch.set_num_threads(1)
    net = _trained()
    clf = advx.Classifier(net)
    x, y = _data()
    results = {name: _run_attack(a, clf, x, y, N) for name, a in _attacks().items()}
    record = {
        "state_dict": net.state_dict(),
        "results": results,
        "fast_broken_by": _broken_by(clf, x, y, N),
        "fast_report": _run_audit(clf, x, y, N),
    }
    RECORD.parent.mkdir(exist_ok=True)
    torch.save(record, RECORD)
    for name, r in results.items():
        print(
            f"{name:12s} success {int(r['success'].sum()):2d}/{N}  "
            f"queries {int(r['queries'].sum()):6d}  grads {int(r['grads'].sum()):5d}"
        )
    print("fast broken_by", record["fast_broken_by"].tolist(), record["fast_report"])


# ---- the tests ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded() -> dict:
    return torch.load(RECORD, weights_only=True)


@pytest.fixture(scope="module")
def setup(recorded) -> tuple[advx.Classifier, torch.Tensor, torch.Tensor]:
    net = _net()
    net.load_state_dict(recorded["state_dict"])
    x, y = _data()
    return advx.Classifier(net.eval()), x, y


def _check(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert torch.equal(got["success"], want["success"]), f"{what}: verdicts differ"
    assert torch.equal(got["queries"], want["queries"]), f"{what}: forward pass counts differ"
    assert torch.equal(got["grads"], want["grads"]), f"{what}: backward pass counts differ"
    torch.testing.assert_close(
        got["distance"], want["distance"], rtol=1e-4, atol=1e-5, msg=f"{what}: distances differ"
    )


def test_record_is_not_trivial(recorded):
    """The record must hold a mix: an attack that always or never succeeds proves little."""
    for name, r in recorded["results"].items():
        hits = int(r["success"].sum())
        assert 0 < hits < N, f"{name}: {hits}/{N} successes"
    assert (recorded["fast_broken_by"] == -1).any() and (recorded["fast_broken_by"] >= 0).any()


# batch size 1 runs every sample alone (tens of seconds on two cores): the slow tier
SIZES = [pytest.param(1, marks=pytest.mark.slow), 37, N]


@pytest.mark.parametrize("batch", SIZES, ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("name", list(_attacks()))
def test_attack_reproduces_record(name: str, batch: int, setup, recorded):
    clf, x, y = setup
    got = _run_attack(_attacks()[name], clf, x, y, batch)
    _check(got, recorded["results"][name], f"{name} at batch size {batch}")


def test_attack_independent_of_chunk_size(setup, recorded):
    """The classifier's chunks (here 7 rows) split passes, not samples: same results."""
    clf, x, y = setup
    chunked = advx.Classifier(clf.net, batch_size=7)
    for name in ("apgd-t", "square-linf", "fab-t", "pgd"):
        got = _run_attack(_attacks()[name], chunked, x, y, N)
        _check(got, recorded["results"][name], f"{name} in chunks of 7")


def test_the_gpu_settings_reproduce_the_record(setup, recorded, monkeypatch):
    """A GPU's settings, run here: done rows frozen until a compaction every 16 steps, and
    APGD-T's and FAB-T's targets (APGD's restarts) side by side: the record's results."""
    from advx.attacks import _lanes, _side

    monkeypatch.setenv(_lanes.ENV, str(_lanes.COMPACT_EVERY["cuda"]))
    monkeypatch.setenv(_side.ENV, str(_side.RUNS_AT_ONCE["cuda"]))
    clf, x, y = setup
    for name in ("apgd-ce", "apgd-t", "apgd-l2", "square-linf", "fab-t", "pgd"):
        got = _run_attack(_attacks()[name], clf, x, y, N)
        _check(got, recorded["results"][name], f"{name} at the GPU settings")


# the fast suite's Square spends 5,000 queries on each gated point: seconds per run, slow tier
@pytest.mark.slow
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
def test_fast_audit_reproduces_record(batch: int, setup, recorded):
    clf, x, y = setup
    assert torch.equal(_broken_by(clf, x, y, batch), recorded["fast_broken_by"])


@pytest.mark.slow
def test_fast_audit_report_reproduces_record(setup, recorded):
    clf, x, y = setup
    assert _run_audit(clf, x, y, 37) == recorded["fast_report"]


if __name__ == "__main__":
    _write()

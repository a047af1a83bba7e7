"""The update loop end to end on the embedded digits: a guard flags adversarial digits into the
review store, a person labels them, the export fine-tunes a new version that is audited against
the old one and promoted -- or refused when it regresses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import advx
from advx.guard import Guard
from advx.guard.store import Store
from advx.guard.update import init, update
from advx.guard.versions import ModelDir

SPEC = f"{Path(__file__).parent / '_loop_model.py'}:mlp"
THREAT = "linf:0.1"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # two cores shared by many processes: torch's thread pool spinning makes tiny models 50x slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def v1_model(trained_mlp):
    from advx.zoo import build

    net = build(SPEC)
    net.load_state_dict(trained_mlp.state_dict())
    return advx.Classifier(net.eval(), bounds=(0, 1))


def _held_out(mnist_test):
    x, y = mnist_test
    return (x[:400], y[:400]), (x[400:], y[400:])  # audit, calibration


def _flag_into_store(guard: Guard, store: Store, x, y) -> int:
    """Adversarial digits through the guard; what it does not accept goes to the review queue,
    as the service queues it. Returns how many were queued."""
    x_adv = advx.PGD(advx.Linf(0.1), steps=10)(guard.model, x, y).x_adv
    items = []
    for row, d in zip(x_adv, guard(x_adv), strict=True):
        if d.action == "accept":
            continue
        items.append(
            {
                "input": row,
                "shape": list(row.shape),
                "action": d.action,
                "label": d.label,
                "predicted": d.predicted,
                "confidence": d.confidence,
                "scores": dict(d.scores),
                "reasons": list(d.reasons),
                "model_version": d.model_version,
                "policy_hash": d.policy_hash,
                "client": "attacker",
            }
        )
    store.put(items)
    return len(items)


def _label_all(store: Store, truth: dict[bytes, int], *, wrong: bool = False) -> int:
    n = 0
    for item in store.list(status="queued", limit=1000):
        full = store.get(item["id"])
        y = truth[np.asarray(full["input"], dtype=np.float32).tobytes()]
        store.label(item["id"], (y + 1) % 10 if wrong else y, by="reviewer@example.org")
        n += 1
    return n


def test_reviewed_items_make_a_better_version_and_a_regression_is_refused(
    tmp_path, v1_model, mnist_train, mnist_test
):
    audit_set, calib_set = _held_out(mnist_test)
    md = ModelDir(tmp_path / "models")
    v1 = init(md, v1_model, data=calib_set, model_spec=SPEC, fpr=0.1)
    assert md.current() == "v0001" == v1.name
    guard = v1.guard()

    # the guard flags adversarial digits into the queue; a person labels them from the truth
    store = Store(f"sqlite:///{tmp_path / 'review.db'}", classes=10)
    xs, ys = mnist_train
    x_att, y_att = xs[:300], ys[:300]
    queued = _flag_into_store(guard, store, x_att, y_att)
    assert queued > 150, queued  # most adversarial digits are not accepted
    x_adv_items = [np.asarray(store.get(i["id"])["input"]) for i in store.list(limit=1000)]
    assert {store.get(i["id"])["model_version"] for i in store.list(limit=5)} == {"v0001"}
    # the truth of each queued input: the label of the digit it was made from
    x_adv = advx.PGD(advx.Linf(0.1), steps=10)(guard.model, x_att, y_att).x_adv
    truth = {x_adv[k].numpy().tobytes(): int(y_att[k]) for k in range(len(x_att))}
    assert _label_all(store, truth) == queued == len(x_adv_items)
    export = store.export(tmp_path / "reviewed.npz")
    assert export["items"] == queued

    train = (xs[300:2300], ys[300:2300])
    result = update(
        md,
        reviewed=tmp_path / "reviewed.npz",
        train_data=train,
        audit_data=audit_set,
        calib_data=calib_set,
        threat=THREAT,
        epochs=1,
        max_drop=0.02,
    )
    assert result.promoted, result.lines()
    assert result.version == "v0002" == md.current()
    # it learned from the reviewed items, and got more robust without losing clean accuracy
    assert result.new["reviewed_accuracy"] > result.old["reviewed_accuracy"] + 0.2
    assert result.new["robust_accuracy"] > result.old["robust_accuracy"]
    assert result.new["clean_accuracy"] >= result.old["clean_accuracy"] - 0.02
    v2 = md.load()
    meta = v2.meta
    assert meta["parent"] == "v0001"
    assert meta["data"]["reviewed"]["n"] == queued
    assert meta["audit"]["new"]["robust_accuracy"] == result.new["robust_accuracy"]
    # recalibrated for the new weights: the policy is bound to them and meets its target
    assert v2.policy.model_fingerprint == v2.model.fingerprint() != v1.model.fingerprint()
    assert v2.policy.guarantees["fpr"]["target"] == 0.1
    assert v2.policy.hash != v1.policy.hash

    # a careless reviewer labels the next batch wrongly: the fine-tune regresses, and is refused
    bad_store = Store(f"sqlite:///{tmp_path / 'review2.db'}", classes=10)
    queued2 = _flag_into_store(v2.guard(), bad_store, x_att, y_att)
    x_adv2 = advx.PGD(advx.Linf(0.1), steps=10)(v2.model, x_att, y_att).x_adv
    truth2 = {x_adv2[k].numpy().tobytes(): int(y_att[k]) for k in range(len(x_att))}
    assert _label_all(bad_store, truth2, wrong=True) == queued2 > 0
    bad_store.export(tmp_path / "wrong.npz")
    refused = update(
        md,
        reviewed=tmp_path / "wrong.npz",
        train_data=train,
        audit_data=audit_set,
        threat=THREAT,
        epochs=1,
        review_share=0.5,
        lr=3e-3,
        max_drop=0.02,
    )
    assert not refused.promoted and refused.version is None
    assert "clean accuracy dropped" in refused.reason
    assert refused.old["clean_accuracy"] - refused.new["clean_accuracy"] > 0.02
    assert md.current() == "v0002" and md.versions() == ["v0001", "v0002"]

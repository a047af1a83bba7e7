"""The versioned model directory: atomic versions and pointer, and a broken version never served."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import advx
from advx.errors import InputError
from advx.guard import Guard, Policy
from advx.guard.versions import ModelDir, VersionError


def _version_of(seed: int):
    torch.manual_seed(seed)
    model = advx.Classifier(advx.zoo.build("wong_cnn").eval(), bounds=(0, 1))
    guard = Guard(model)
    x, y = advx.data.load("mnist-demo", split="test", n=200)
    guard.calibrate(x, y, fpr=0.1)
    return model, guard.policy


@pytest.fixture(scope="module")
def two_models():
    return _version_of(0), _version_of(1)


def test_add_then_promote_switches_the_pointer(tmp_path, two_models):
    (m1, p1), (m2, p2) = two_models
    md = ModelDir(tmp_path / "models")
    assert md.current() is None and md.versions() == []
    v1 = md.add(m1, p1, info={"data": {"sha256": "ab" * 32}})
    assert v1 == "v0001" and md.current() is None  # written, not yet served
    md.promote(v1)
    assert md.current() == "v0001"
    v2 = md.add(m2, p2, parent=v1)
    assert v2 == "v0002" and md.current() == "v0001"
    loaded = md.promote(v2)
    assert md.current() == "v0002"
    assert (tmp_path / "models" / "current").read_text() == "v0002\n"
    assert loaded.model.fingerprint() == m2.fingerprint()
    assert loaded.meta["parent"] == "v0001" and loaded.meta["policy_hash"] == p2.hash
    assert md.meta(v1)["data"]["sha256"] == "ab" * 32
    # the guard a version builds carries its name into every decision
    x, _ = advx.data.load("mnist-demo", split="test", n=3)
    assert {d.model_version for d in loaded.guard()(x)} == {"v0002"}
    # nothing half-written is left behind
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["current", "v0001", "v0002"]


def test_a_damaged_version_is_never_made_current(tmp_path, two_models):
    (m1, p1), (m2, p2) = two_models
    md = ModelDir(tmp_path)
    md.promote(md.add(m1, p1))
    v2 = md.add(m2, p2, parent="v0001")
    weights = next((tmp_path / v2).glob("model-*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(VersionError, match="v0002 cannot be loaded.*sha256"):
        md.promote(v2)
    assert md.current() == "v0001"
    assert md.load().model.fingerprint() == m1.fingerprint()  # the old one still loads


def test_a_policy_for_other_weights_is_refused(tmp_path, two_models):
    (m1, p1), (m2, p2) = two_models
    md = ModelDir(tmp_path)
    with pytest.raises(InputError, match="recalibrate"):
        md.add(m2, p1)
    md.promote(md.add(m1, p1))
    v2 = md.add(m2, p2)
    p1.save(tmp_path / v2 / "policy.toml")  # swapped by hand afterwards
    with pytest.raises(VersionError, match="calibrated for model"):
        md.promote(v2)
    assert md.current() == "v0001"


def test_missing_version_and_no_current_are_clear(tmp_path):
    md = ModelDir(tmp_path)
    with pytest.raises(InputError, match="no current version.*advx guard init"):
        md.load()
    with pytest.raises(VersionError, match="no version v0007"):
        md.promote("v0007")
    with pytest.raises(InputError, match="expected a name such as v0001"):
        md.load("../etc")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with pytest.raises(InputError, match="model_spec"):
        md.add(advx.Classifier(net, bounds=(0, 1)), Policy())


def test_the_pointer_switch_is_atomic(tmp_path, two_models, monkeypatch):
    (m1, p1), (m2, p2) = two_models
    md = ModelDir(tmp_path)
    md.promote(md.add(m1, p1))
    v2 = md.add(m2, p2)
    # readers during many switches see one version or the other, never nothing or garbage
    seen: set = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.add(md.current())
            except Exception as e:  # a torn or missing pointer must show up as a failure
                seen.add(repr(e))

    t = threading.Thread(target=read)
    t.start()
    for _ in range(30):
        md.promote(v2)
        md.promote("v0001")
    stop.set()
    t.join()
    assert seen == {"v0001", "v0002"}
    # a crash at the rename leaves the old pointer whole and no temporary file behind
    real = os.replace

    def crash(src, dst):
        if str(dst).endswith("current"):
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        md.promote(v2)
    assert md.current() == "v0001"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

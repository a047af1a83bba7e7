"""The policy file: TOML written atomically, read back exactly, anything else refused clearly."""

from __future__ import annotations

import math

import pytest

from advx.errors import InputError
from advx.guard import Policy
from advx.guard.policy import _toml, dumps_toml

tomllib = _toml()  # the standard reader (tomli on Python 3.10)


def _policy() -> Policy:
    return Policy(
        thresholds={"feature_squeezing": 0.8125, "energy": -7.25e-3, "odd name": 1e-300},
        min_confidence=0.7,
        on_detect="reject",
        on_low_confidence="fallback",
        model_fingerprint="ab" * 32,
        guarantees={
            "fpr": {"target": 0.05, "interval": [0.031, 0.07], "n": 500, "met": True},
            "note": 'quotes " and \\ backslash, a tab\t, a newline\n, é, 数字, \x7f',
        },
        calibration={"data_sha256": "cd" * 32, "n": 1000, "scales": {"energy": 2.5}},
        detectors={
            "feature_squeezing": {"kind": "feature_squeezing", "squeezers": ["bits:1"]},
            "energy": {"kind": "energy", "temperature": 1.0},
            "odd name": {"kind": "max_logit"},
        },
    )


def test_save_and_load_round_trip_exactly(tmp_path):
    pol = _policy()
    path = pol.save(tmp_path / "sub" / "policy.toml")
    text = path.read_text()
    doc = tomllib.loads(text)  # a standard TOML reader agrees
    assert doc["advx_policy"] == 1 and doc["hash"] == pol.hash
    back = Policy.load(path)
    assert back == pol
    assert back.hash == pol.hash
    assert not list(tmp_path.joinpath("sub").glob(".*tmp"))  # no temporary file left behind


def test_none_and_special_floats_round_trip(tmp_path):
    pol = Policy(thresholds={"a": math.inf, "b": -math.inf}, guarantees={"x": None, "y": 1.5})
    back = Policy.load(pol.save(tmp_path / "p.toml"))
    assert back.thresholds == {"a": math.inf, "b": -math.inf}
    assert back.model_fingerprint is None
    assert back.guarantees == {"y": 1.5}


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\x00\xff\xfe garbage", "not a text file"),
        (b"thresholds = {", "not valid TOML"),
        (b"min_confidence = 0.5\n", "not an advx policy file"),
        (b"advx_policy = 99\n", "not an advx policy file"),
        (b'advx_policy = 1\nthresholds = "high"\n', "thresholds must be"),
        (b'advx_policy = 1\n[thresholds]\nenergy = "x"\n', "thresholds.energy must be a number"),
        (b"advx_policy = 1\nmin_confidence = 2.0\n", "min_confidence"),
        (b'advx_policy = 1\non_detect = "explode"\n', "on_detect"),
        (b"advx_policy = 1\nthreshold = 1\n", "unknown keys ['threshold']"),
        (b"advx_policy = 1\nmin_confidence = true\n", "min_confidence must be"),
        (b'advx_policy = 1\n[detectors.energy]\nkind = "energy"\n', "no threshold"),
    ],
)
def test_a_corrupt_or_foreign_file_is_refused_naming_the_path(tmp_path, content, words):
    path = tmp_path / "policy.toml"
    path.write_bytes(content)
    with pytest.raises(InputError) as e:
        Policy.load(path)
    assert str(path) in str(e.value)
    assert words in str(e.value)


def test_a_hand_edited_or_truncated_file_is_refused(tmp_path):
    path = _policy().save(tmp_path / "p.toml")
    text = path.read_text()
    path.write_text(text.replace("min_confidence = 0.7", "min_confidence = 0.2"))
    with pytest.raises(InputError, match="does not match its contents"):
        Policy.load(path)
    path.write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match=str(path).replace("\\", "\\\\")):
        Policy.load(path)
    # dropping the hash line accepts the edit on purpose
    edited = "\n".join(
        ln
        for ln in text.replace("min_confidence = 0.7", "min_confidence = 0.2").splitlines()
        if not ln.startswith("hash =")
    )
    path.write_text(edited)
    assert Policy.load(path).min_confidence == 0.2


def test_a_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        Policy.load(tmp_path / "nope.toml")


def test_a_failed_save_leaves_the_old_file_whole(tmp_path):
    path = _policy().save(tmp_path / "p.toml")
    before = path.read_bytes()
    bad = Policy(guarantees={"oops": object()})
    with pytest.raises(TypeError):
        bad.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.toml"]


def test_the_hash_changes_with_any_field_and_not_with_key_order():
    a = _policy()
    b = Policy(**{**a.to_dict(), "thresholds": dict(reversed(list(a.thresholds.items())))})
    assert a.hash == b.hash
    c = Policy(**{**a.to_dict(), "min_confidence": 0.71})
    assert c.hash != a.hash


def test_policy_values_are_checked():
    with pytest.raises(InputError, match="thresholds"):
        Policy(thresholds={"a": math.nan})
    with pytest.raises(InputError, match="on_low_confidence"):
        Policy(on_low_confidence="shrug")  # type: ignore[arg-type]
    assert Policy(thresholds={"energy": -12.5}).thresholds["energy"] == -12.5  # negative is fine


def test_dumps_toml_writes_nested_tables_after_scalars():
    text = dumps_toml({"a": 1, "t": {"x": [1, 2], "u": {"y": "z"}}, "b": False})
    assert tomllib.loads(text) == {"a": 1, "b": False, "t": {"x": [1, 2], "u": {"y": "z"}}}

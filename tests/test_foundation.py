"""The foundation's small pieces: names, hashes, provenance, a group of one, progress bars."""

import pytest
import torch

from advx._distributed import Group, current_group
from advx._io import import_object, sha256_bytes, sha256_file, sha256_tensors
from advx._progress import bar, enabled, progress, quiet
from advx._provenance import provenance
from advx.errors import InputError


def test_import_object_from_a_module_and_from_a_file(tmp_path):
    assert import_object("math:sqrt", name="model")(4.0) == 2.0
    f = tmp_path / "make.py"
    f.write_text("def make():\n    return 7\n")
    assert import_object(f"{f}:make")() == 7
    with pytest.raises(InputError, match=r"^model: .*no attribute 'nope'"):
        import_object("math:nope", name="model")
    with pytest.raises(InputError, match="no file"):
        import_object(f"{tmp_path}/missing.py:make")
    with pytest.raises(InputError, match="pkg.module:attr"):
        import_object("math")
    with pytest.raises(InputError, match="cannot import"):
        import_object("no_such_module_xyz:f")


def test_hashes_of_bytes_files_and_tensors(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    assert sha256_file(tmp_path / "a") == sha256_bytes(b"abc")
    a = torch.arange(6, dtype=torch.float32)
    assert sha256_tensors(a) == sha256_tensors(a.view(2, 3).clone())  # values, not shape
    assert sha256_tensors(a) != sha256_tensors(a.double())  # the bytes differ with the dtype
    assert sha256_tensors(torch.tensor(3)) == sha256_tensors(torch.tensor([3]))  # 0-dim works


def test_provenance_has_versions_and_drops_unknowns():
    p = provenance(device="cpu", seed=3, data="x", weights_sha256=None)
    assert p["advx"] and p["torch"] == torch.__version__ and p["python"]
    assert p["seed"] == 3 and p["device"] == "cpu" and p["data"] == "x"
    assert "weights_sha256" not in p and p["threads"] >= 1


def test_a_group_of_one_answers_locally():
    g = current_group()
    assert g == Group() and g.main and not g.distributed
    assert g.shard(5).tolist() == [0, 1, 2, 3, 4]
    assert Group(1, 3).shard(7).tolist() == [1, 4]
    t = torch.tensor([1.0, 2.0])
    assert g.sum(t) is t and g.gather("x") == ["x"] and g.all_gather(1) == [1]


def test_progress_setting(monkeypatch):
    monkeypatch.setenv("ADVX_PROGRESS", "0")
    assert enabled() is False
    assert list(progress(range(3))) == [0, 1, 2]
    with bar(total=3, desc="x") as b:  # silent, but usable
        b.update(2)
        b.write("line")
    monkeypatch.setenv("ADVX_PROGRESS", "1")
    assert enabled() is True
    with quiet():
        assert enabled() is False

"""Atomic writes: all or nothing, and the mode a plain open() would give."""

import os
import stat

import pytest

from advx._io import atomic_open


def test_a_written_file_gets_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_open(tmp_path / "a.json", "w") as f:
            f.write("{}")
        with open(tmp_path / "b.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "b.json").st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(tmp_path / "a.txt", "w") as f:
            f.write("new, half")
            raise RuntimeError("disk full")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]

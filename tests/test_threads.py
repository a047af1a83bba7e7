"""advx._threads.configure: torch's thread count from the CPUs the process may really use."""

from __future__ import annotations

import logging

import pytest
import torch

from advx import _threads
from advx.errors import InputError


@pytest.fixture(autouse=True)
def machine(monkeypatch, tmp_path):
    """A pretend machine: 16 CPUs, all in the affinity mask, nearly idle, no cgroup files, no
    thread variables; torch's own count restored afterwards."""
    before = torch.get_num_threads()
    monkeypatch.setattr(_threads.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(_threads.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(_threads.os, "getloadavg", lambda: (0.3, 0.2, 0.1), raising=False)
    monkeypatch.setattr(_threads, "CGROUP_ROOT", tmp_path)
    for name in ("OMP_NUM_THREADS", "ADVX_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path
    torch.set_num_threads(before)


def test_the_cgroup_v2_quota_caps_the_threads(machine, caplog):
    (machine / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    torch.set_num_threads(16)  # what torch picks from the host's cores
    with caplog.at_level(logging.INFO, logger="advx.threads"):
        assert _threads.configure() == 2
    assert torch.get_num_threads() == 2
    assert "torch threads: 2, was 16 (CPUs available: affinity 16, cgroup quota 1.5" in caplog.text


def test_no_quota_leaves_the_affinity_mask(machine, monkeypatch):
    (machine / "cpu.max").write_text("max 100000\n")
    monkeypatch.setattr(_threads.os, "sched_getaffinity", lambda pid: {0, 3, 5})
    torch.set_num_threads(8)
    assert _threads.available_cpus() == 3
    assert _threads.configure() == 3 and torch.get_num_threads() == 3


def test_cgroup_v1_and_unreadable_files(machine):
    (machine / "cpu").mkdir()
    (machine / "cpu" / "cpu.cfs_quota_us").write_text("50000")
    (machine / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert _threads.cgroup_cpu_limit() == 0.5
    assert _threads.available_cpus() == 1  # never zero
    (machine / "cpu" / "cpu.cfs_quota_us").write_text("-1")  # v1's "no quota"
    assert _threads.cgroup_cpu_limit() is None
    (machine / "cpu.max").write_text("garbage")
    assert _threads.cgroup_cpu_limit() is None
    assert _threads.available_cpus() == 16


def test_a_loaded_machine_leaves_fewer_threads(monkeypatch, caplog):
    torch.set_num_threads(16)
    monkeypatch.setattr(_threads.os, "getloadavg", lambda: (14.2, 9.0, 5.0))  # others' threads
    assert _threads.idle_cpus() == 2
    with caplog.at_level(logging.INFO, logger="advx.threads"):
        assert _threads.configure() == 2
    assert torch.get_num_threads() == 2
    assert "2 idle at load 14.2 on 16 CPUs" in caplog.text
    monkeypatch.setattr(_threads.os, "getloadavg", lambda: (40.0, 40.0, 40.0))  # oversubscribed
    assert _threads.available_cpus() == 1
    assert _threads.available_cpus(load_aware=False) == 16
    torch.set_num_threads(16)
    assert _threads.configure(load_aware=False) == 16


def test_a_lower_count_the_user_chose_is_kept(machine):
    (machine / "cpu.max").write_text("400000 100000\n")
    torch.set_num_threads(1)
    assert _threads.configure() == 1 and torch.get_num_threads() == 1


def test_omp_num_threads_is_honoured(machine, monkeypatch, caplog):
    (machine / "cpu.max").write_text("100000 100000\n")
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    torch.set_num_threads(6)  # torch read the variable when it started
    with caplog.at_level(logging.INFO, logger="advx.threads"):
        assert _threads.configure() == 6
    assert torch.get_num_threads() == 6
    assert "OMP_NUM_THREADS=6 is set" in caplog.text


def test_advx_num_threads_forces_a_count(machine, monkeypatch):
    monkeypatch.setenv("ADVX_NUM_THREADS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert _threads.configure() == 3 and torch.get_num_threads() == 3
    monkeypatch.setenv("ADVX_NUM_THREADS", "many")
    with pytest.raises(InputError, match="ADVX_NUM_THREADS: must be a whole number"):
        _threads.configure()


def test_on_this_machine_without_pretending(monkeypatch):
    monkeypatch.undo()  # the autouse fixture's pretend machine: read the real one
    n = _threads.available_cpus()
    assert 1 <= n <= (torch.multiprocessing.cpu_count() or 1)

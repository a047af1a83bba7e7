"""How many CPU threads torch should use: the CPUs this process may actually run on.

torch sizes its intra-op pool from the machine (or the affinity mask), not from a container's
CPU quota nor from what other processes already keep busy: on a 64-core host with a 2-CPU quota
it starts 64 threads, and on a shared machine its threads wait on each other's time slices at
every parallel region (PGD-40 on a loaded 2-core machine: a median of 16 s with one thread,
239 s with two; benchmarks/RESULTS.md). :func:`configure` lowers the count to the CPUs
available (the affinity mask, the cgroup quota and the CPUs the load average leaves idle,
whichever is smallest), never raises it, and leaves alone a count the user chose
(``OMP_NUM_THREADS``, a lower ``torch.set_num_threads``). ``ADVX_NUM_THREADS`` forces a count.
Call it where work starts (the CLI's entry point, before any work of its own loads the
machine); a library import must not change a user's process-wide settings.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from ._validate import env_count

__all__ = ["available_cpus", "cgroup_cpu_limit", "configure", "idle_cpus"]

log = logging.getLogger("advx.threads")

# where the cgroup file system is mounted (a module attribute so that tests can point it elsewhere)
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def cgroup_cpu_limit() -> float | None:
    """The CPU quota of this process's cgroup in CPUs (1.5 = one and a half), or None when
    there is none or it cannot be read: cgroup v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD"),
    else cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none)."""
    text = _read(CGROUP_ROOT / "cpu.max")
    if text is not None:
        parts = text.split()
        if len(parts) != 2 or parts[0] == "max":
            return None
        quota, period = parts
    else:
        quota = _read(CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us") or ""
        period = _read(CGROUP_ROOT / "cpu" / "cpu.cfs_period_us") or ""
    try:
        q, p = float(quota), float(period)
    except ValueError:
        return None
    if not (math.isfinite(q) and math.isfinite(p)) or q <= 0 or p <= 0:
        return None
    return q / p


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def idle_cpus() -> int | None:
    """The machine's CPUs less its 1-minute load average (other processes' runnable threads),
    rounded, at least 1; None where there is no load average. A thread more than this waits
    for a time slice while the others wait for it at the next barrier."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return None
    if not math.isfinite(load):
        return None
    return max(1, int((os.cpu_count() or 1) - load + 0.5))


def available_cpus(*, load_aware: bool = True) -> int:
    """The CPUs this process may use: the affinity mask, capped by the cgroup quota (rounded
    up: a 1.5-CPU quota keeps two threads busy half the time, better than one all the time)
    and, with ``load_aware``, by the CPUs the machine's load leaves idle."""
    n = _affinity()
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, math.ceil(quota))
    idle = idle_cpus() if load_aware else None
    if idle is not None:
        n = min(n, idle)
    return max(1, n)


def configure(*, load_aware: bool = True) -> int:
    """Set torch's intra-op thread count from the CPUs available; returns the count in use.

    ``ADVX_NUM_THREADS`` wins; with ``OMP_NUM_THREADS`` set the user's choice (which torch has
    read) is kept; otherwise torch's count is lowered to :func:`available_cpus` when it is
    higher, and kept when it is already lower (the user's ``torch.set_num_threads``)."""
    import torch

    forced = env_count("ADVX_NUM_THREADS", what="threads", one="one thread")
    current = torch.get_num_threads()
    if forced is not None:
        if forced != current:
            torch.set_num_threads(forced)
        log.info("torch threads: %d (ADVX_NUM_THREADS)", forced)
        return forced
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        log.info("torch threads: %d (OMP_NUM_THREADS=%s is set; left as it is)", current, omp)
        return current
    avail = available_cpus(load_aware=load_aware)
    quota = cgroup_cpu_limit()
    idle = idle_cpus() if load_aware else None
    where = f"affinity {_affinity()}" + ("" if quota is None else f", cgroup quota {quota:g}")
    if idle is not None:
        where += f", {idle} idle at load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    if current > avail:
        torch.set_num_threads(avail)
        log.info("torch threads: %d, was %d (CPUs available: %s)", avail, current, where)
        return avail
    log.info("torch threads: %d (CPUs available: %s)", current, where)
    return current

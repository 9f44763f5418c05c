"""How many cores this process may use: its CPU affinity, capped by the cgroup v2 quota.

Used by ``rnnzoo serve --workers 0`` and ``rnnzoo zoo build --jobs 0``; ``os.cpu_count`` would
count cores a container cannot use.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def cgroup_cpu_limit(
    cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
    proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
) -> float | None:
    """The cgroup v2 CPU quota of this process in cores (``cpu.max``: quota / period), the
    smallest along its cgroup's path up to the root; None when there is none (``max``, no
    cgroup v2, unreadable)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    rel = next((ln[3:] for ln in lines if ln.startswith("0::")), None)
    if rel is None:
        return None
    root = Path(cgroup_root)
    d = root / rel.strip().lstrip("/")
    limit = None
    while True:
        try:
            quota, period = (Path(d) / "cpu.max").read_text().split()[:2]
            if quota != "max" and float(period) > 0:
                cores = float(quota) / float(period)
                limit = cores if limit is None else min(limit, cores)
        except (OSError, ValueError):
            pass
        if d == root or root not in d.parents:
            return limit
        d = d.parent


def usable_cores(
    cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
    proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
) -> int:
    """Cores this process may use: its CPU affinity, capped by the cgroup quota (rounded up:
    a quota of 1.5 cores keeps two workers busy half the time each)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)

"""How many CPUs this process may run on: its affinity mask (taskset, cgroup cpusets), not the
machine's count, so thread pools are not oversubscribed on a pinned or containerised node."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1

"""How many CPUs this process may run on: its affinity mask (taskset, cgroup cpusets), not the
machine's count, so thread pools are not oversubscribed on a pinned or containerised node."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1


def engine_threads(configured: int = 0) -> int:
    """torch intra-op threads for a node's stage engines (`cpu_threads`; 0: half the usable CPUs, at most 8), so
    the node's event loop and HTTP front end keep cores (more threads spin between a step's small ops)."""
    return configured if configured > 0 else max(1, min(8, usable_cpus() // 2))

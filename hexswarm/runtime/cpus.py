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


# below this many usable CPUs a CPU node's engine stays in the node process: its own process would share the cores
# with the event loop anyway (2 cores: no variant better in two A/Bs, BENCHMARKS run 23); from it up, the engine
# process keeps its threads off the loop's GIL (16 cores: 3.3x the tokens/s at one request, 2.0x at 32; run 24).
# Measured at 2 and 16 CPUs only: 8, so a 4-core runner keeps the path the test suite is measured on
OWN_PROCESS_MIN_CPUS = 8


def engine_in_own_process(device: str) -> bool:
    """Where a node's stage engines run when `engine_process` is auto: their own process on CUDA, and on a CPU
    node with cores enough for it."""
    return device == "cuda" or usable_cpus() >= OWN_PROCESS_MIN_CPUS


def engine_torch_threads(device: str) -> int | None:
    """torch threads a stage engine runs with by default (None: torch's own, in the node's process)."""
    return engine_threads() if engine_in_own_process(device) else None

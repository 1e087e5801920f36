"""Short garbage-collector pauses in long-lived serving processes.

Python's cyclic collector scans, on each full pass, every container object alive: in a node or an
engine process that is the start-up heap (torch, libp2p, trio, the model's modules: 200k+ objects,
~70 ms a pass on the CI CPU) and it holds the GIL meanwhile, so the engine's steps and the token
relay stop together.  Served requests allocate enough (token events, messages) to trigger such passes
every few seconds; under 32 streams on an H100 that showed as requests whose first token came 150-250
ms late (docs/BENCHMARKS.md, run 20).  `freeze_heap` moves what is alive once start-up is done into the
collector's permanent generation (as vLLM does after loading its model), so full passes scan only what
serving made since.  `PauseWatch` times every pass, for the node's metrics.
"""

from __future__ import annotations

import gc
import time


def freeze_heap() -> int:
    """Collect what is garbage now (the objects frozen before included), then exempt everything still
    alive from later passes; returns the number of objects frozen.  Call it when a process has finished
    loading, and again after each load or unload: a frozen object is never collected, so what an unload
    leaves in reference cycles (a retired stage's engine) is found only by this call's collection."""
    global _FROZEN
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    _FROZEN = gc.get_freeze_count()
    return _FROZEN


_FROZEN = 0  # the count at the last freeze_heap


def frozen_objects() -> int:
    """Objects the last freeze_heap froze.  Kept, not counted again: gc.get_freeze_count walks the frozen
    heap (~25 ms on the CI CPU), and /metrics read it on the event loop at every scrape."""
    return _FROZEN


class PauseWatch:
    """Totals of the collector's passes in this process, per generation: how many, how long in all, the
    longest.  Updated from the collector's callback, which may run in any thread at any allocation, so
    it takes no lock (passes never overlap: the collector does not reenter)."""

    def __init__(self) -> None:
        self.passes = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest_s = 0.0
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        g, dt = min(2, max(0, info.get("generation", 0))), time.perf_counter() - self._t0
        self.passes[g] += 1
        self.seconds[g] += dt
        if dt > self.longest_s:
            self.longest_s = dt

    def install(self) -> "PauseWatch":
        if self not in gc.callbacks:
            gc.callbacks.append(self)
        return self

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


_WATCH: PauseWatch | None = None


def process_watch() -> PauseWatch:
    """This process's one PauseWatch, installed on first use."""
    global _WATCH
    if _WATCH is None:
        _WATCH = PauseWatch().install()
    return _WATCH

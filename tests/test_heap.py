"""runtime/heap.py: the loaded heap leaves the collector's passes; every pass is counted and timed."""

from __future__ import annotations

import gc
import weakref

from hexswarm.runtime.heap import PauseWatch, freeze_heap, frozen_objects


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_freeze_heap_collects_garbage_first_then_exempts_what_is_alive():
    alive = _Node()
    garbage = _Node()
    garbage_id = id(garbage)
    del garbage
    try:
        n = freeze_heap()
        assert n == frozen_objects() > 0
        tracked = gc.get_objects()
        assert not any(o is alive for o in tracked)  # frozen: no later pass scans it
        assert garbage_id not in {id(o) for o in gc.get_objects(generation=2)}
        made_after = _Node()
        assert any(o is made_after for o in gc.get_objects())  # new objects are collected as before
    finally:
        gc.unfreeze()
    assert any(o is alive for o in gc.get_objects())


def test_a_frozen_cycle_that_becomes_garbage_is_collected_by_the_next_freeze():
    """A retired stage's engine, frozen while it served: no pass collects it, the next freeze_heap does."""
    node = _Node()
    ref = weakref.ref(node)
    try:
        freeze_heap()
        del node
        gc.collect()
        assert ref() is not None  # frozen: ordinary passes do not see the cycle
        freeze_heap()
        assert ref() is None
    finally:
        gc.unfreeze()


def test_pause_watch_counts_and_times_every_pass_by_generation():
    watch = PauseWatch().install()
    try:
        watch.install()  # installing twice keeps one callback
        assert gc.callbacks.count(watch) == 1
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    finally:
        watch.remove()
    assert watch.passes[0] >= 1 and watch.passes[2] >= 2
    assert watch.seconds[2] > 0 and watch.longest_s >= max(watch.seconds[2] / watch.passes[2], 0)
    before = list(watch.passes)
    gc.collect(2)
    assert watch.passes == before and watch not in gc.callbacks  # removed: no longer counts

"""How busy a process's trio event loop is: wall time spent running tasks (between two of its I/O waits) as
opposed to waiting for I/O.  A process's CPU time does not say this: a loop that waits for the GIL, or for
cores shared with other processes, is busy to whatever waits behind it (a request's start, a first token)
without using CPU.  Read by `/metrics` (hexswarm_event_loop_*) and by tools/bench_serve.py's entry probe."""

from __future__ import annotations

import logging
import time

import trio

log = logging.getLogger("hexswarm.loop")

SLOW_BATCH_S = 0.02  # a run of tasks this long holds every other task (a start, a token) back noticeably
LOG_EVERY_S = 1.0  # at most one line a second about a task step that held the loop
NAME_FOR_S = 30.0  # after a slow run of tasks, time each task step this long, to name the ones that hold the loop


class LoopWatch(trio.abc.Instrument):
    """Totals for one trio run: busy seconds, scheduler batches (runs of tasks between I/O waits), the
    longest batch and how many took at least SLOW_BATCH_S.  Its hooks run once per loop pass; after a slow
    batch it also times every task step (one task running until it awaits) for NAME_FOR_S (a `StepNamer`
    instrument added for that long), so that a step of SLOW_BATCH_S or more is logged with its task's name:
    what held the loop.  Timing every step always cost ~1.5 us a task step, +60% on trio's own scheduling
    (tools/bench_loop_watch.py; 4-5% of a CPU entry's loop under 32 streams, BENCHMARKS run 22).  Trio
    calls the hooks from its own thread only."""

    def __init__(self) -> None:
        self.busy_s = 0.0
        self.batches = 0
        self.slow_batches = 0
        self.longest_s = 0.0
        self._since: float | None = None  # end of the last I/O wait
        self._namer = StepNamer()
        self._naming_until: float | None = None  # the StepNamer is installed until then

    def after_io_wait(self, timeout: float) -> None:
        self._since = time.perf_counter()

    def before_io_wait(self, timeout: float) -> None:
        if self._since is None:
            return
        now = time.perf_counter()
        dt = now - self._since
        self.busy_s += dt
        self.batches += 1
        if dt > self.longest_s:
            self.longest_s = dt
        if dt >= SLOW_BATCH_S:
            self.slow_batches += 1
            if self._naming_until is None:
                trio.lowlevel.add_instrument(self._namer)
                log.info("event loop held %.0f ms by a run of tasks; naming the task steps that hold it for the "
                         "next %.0f s", dt * 1e3, NAME_FOR_S)
            self._naming_until = now + NAME_FOR_S
        elif self._naming_until is not None and now > self._naming_until:
            self._naming_until = None
            try:
                trio.lowlevel.remove_instrument(self._namer)
            except KeyError:  # trio already removed it (a hook of it raised): this hook must not raise too
                pass


class StepNamer(trio.abc.Instrument):
    """Times each task step; logs (at most one line a second) the task of one that held the loop for
    SLOW_BATCH_S or more.  Installed by LoopWatch only while the loop has been slow lately."""

    def __init__(self) -> None:
        self._step_t0 = 0.0
        self._logged = -LOG_EVERY_S

    def before_task_step(self, task) -> None:
        self._step_t0 = time.perf_counter()

    def after_task_step(self, task) -> None:
        now = time.perf_counter()
        dt = now - self._step_t0
        if dt >= SLOW_BATCH_S and now - self._logged >= LOG_EVERY_S:
            self._logged = now
            log.info("event loop held %.0f ms by one step of task %s", dt * 1e3, task.name)


_WATCH: LoopWatch | None = None


def loop_watch() -> LoopWatch:
    """This process's LoopWatch (pass it to trio.run's instruments; metrics read it)."""
    global _WATCH
    if _WATCH is None:
        _WATCH = LoopWatch()
    return _WATCH

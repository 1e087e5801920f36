"""runtime/loop_watch.py: the event loop's busy time, as opposed to time waiting for I/O."""

from __future__ import annotations

import time

import trio

from hexswarm.runtime.loop_watch import SLOW_BATCH_S, LoopWatch


def test_a_task_that_holds_the_loop_counts_as_busy_and_a_sleeping_one_does_not():
    watch = LoopWatch()

    async def main():
        await trio.sleep(0.5)  # waiting: not busy
        idle = watch.busy_s
        time.sleep(0.05)  # a task that holds the loop (a blocking call) for 50 ms: one slow batch
        await trio.sleep(0)
        return idle

    idle = trio.run(main, instruments=[watch])
    assert idle < 0.25  # (bounds with room for a loaded CI machine)
    assert 0.05 <= watch.busy_s < idle + 0.05 + 0.25
    assert watch.longest_s >= 0.05 > SLOW_BATCH_S and watch.slow_batches >= 1 and watch.batches >= 2


def test_a_task_step_that_holds_the_loop_again_is_named_in_the_log(caplog):
    """The first slow run of tasks is logged unnamed and turns step timing on; the hog's next step is named.
    Until then no step is timed (StepNamer is not installed: a hook per step costs trio ~60% a checkpoint)."""
    import logging

    watch = LoopWatch()
    installed: list[bool] = []

    async def hog():
        await trio.sleep(0)
        time.sleep(0.03)  # slow, unnamed: naming starts
        await trio.sleep(0)
        time.sleep(0.03)  # named

    async def main():
        installed.append("before_task_step" in _instruments())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hog, name="the-hog")
        installed.append("before_task_step" in _instruments())

    with caplog.at_level(logging.INFO, logger="hexswarm.loop"):
        trio.run(main, instruments=[watch])
    lines = [r.getMessage() for r in caplog.records]
    assert installed == [False, True], installed
    assert sum("naming the task steps" in m for m in lines) == 1, lines
    assert any("one step of task the-hog" in m for m in lines), lines
    assert watch.slow_batches >= 2


def _instruments():
    from trio._core._run import GLOBAL_RUN_CONTEXT

    return GLOBAL_RUN_CONTEXT.runner.instruments


def test_step_timing_goes_off_again_after_the_naming_window(monkeypatch):
    from hexswarm.runtime import loop_watch

    monkeypatch.setattr(loop_watch, "NAME_FOR_S", 0.05)
    seen: list[bool] = []

    async def main():
        time.sleep(0.03)  # a slow run of tasks: step timing on
        await trio.sleep(0)
        seen.append("before_task_step" in _instruments())
        await trio.sleep(0.1)  # the window passes with no slow run
        await trio.sleep(0)
        seen.append("before_task_step" in _instruments())

    trio.run(main, instruments=[LoopWatch()])
    assert seen == [True, False]

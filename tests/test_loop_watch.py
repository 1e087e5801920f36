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


def test_a_task_step_that_holds_the_loop_is_named_in_the_log(caplog):
    import logging

    async def hog():
        time.sleep(0.03)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hog, name="the-hog")

    with caplog.at_level(logging.INFO, logger="hexswarm.loop"):
        trio.run(main, instruments=[LoopWatch()])
    assert any("the-hog" in r.getMessage() for r in caplog.records), caplog.text

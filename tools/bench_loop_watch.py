#!/usr/bin/env python
"""The cost of the node's event-loop instrument (hexswarm/runtime/loop_watch.py) on trio's scheduling: TASKS
trio tasks each doing STEPS checkpoints, microseconds per task step without and with `LoopWatch`, a few runs.

    python tools/bench_loop_watch.py [--tasks 16] [--steps 20000] [--runs 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hexswarm.runtime.loop_watch import LoopWatch  # noqa: E402


def us_per_step(tasks: int, steps: int, instruments: list) -> float:
    async def worker():
        for _ in range(steps):
            await trio.lowlevel.checkpoint()

    async def main():
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(worker)

    t = time.perf_counter()
    trio.run(main, instruments=instruments)
    return (time.perf_counter() - t) / (tasks * steps) * 1e6


def main(argv=None) -> list[tuple[float, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args(argv)
    out = []
    for _ in range(a.runs):
        out.append((us_per_step(a.tasks, a.steps, []), us_per_step(a.tasks, a.steps, [LoopWatch()])))
        print(f"without {out[-1][0]:.2f} us a task step, with LoopWatch {out[-1][1]:.2f}", flush=True)
    return out


if __name__ == "__main__":
    main()

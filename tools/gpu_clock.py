"""GPU timing shared by the benchmark tools, torch only (tune_quant.py runs where hexswarm's
other dependencies are not installed)."""

from __future__ import annotations

import statistics
import time

import torch


class Clock:
    """Milliseconds of fn(): CUDA events on a GPU, the host clock elsewhere; median of repeats."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def times(self, fn, warmup: int, repeats: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        out = []
        for _ in range(repeats):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t) * 1e3)
        return out

    def median(self, fn, warmup: int, repeats: int) -> float:
        return statistics.median(self.times(fn, warmup, repeats))


def copy_bandwidth(device: torch.device, clock: Clock, nbytes: int) -> float:
    """Device-to-device copy, bytes read + written per second (random data, not zeros)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = clock.median(lambda: dst.copy_(src), 3, 20)
    del src, dst
    return 2 * nbytes / (ms / 1e3)

"""Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the
kernel before it in the stream is still running, and hides its launch and the first weight loads
behind that kernel's tail (a batch-1 decode step is ~300 short kernels; BENCHMARKS run 26).

The contract, for every kernel launched with `launch_kwargs`: call `release` early (the next
kernel may then launch), and `wait` before reading anything an earlier kernel wrote or writing
anything at all.  Before it a kernel may read only what no kernel of the step writes: weights, and
the step's inputs copied in before its first kernel (the decode attention reads its rows' slots,
positions, block tables and the cache below this step's positions there).  A chain of PDL kernels
may run several deep at once (each releases its successor before waiting), so "the kernel just
before has not written it" is not enough.  `wait` returns once the kernel before has finished, which
had itself waited for its own predecessor, so everything an earlier kernel wrote is visible.
Without the launch attribute both calls do nothing.
HEXSWARM_PDL=0 turns it off.
"""

from __future__ import annotations

import functools
import os

import torch

ENV = "HEXSWARM_PDL"

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU-only hosts
    HAVE_TRITON = False
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAVE_GDC = True
except Exception:  # pragma: no cover - CPU-only hosts, or a Triton without grid dependency control
    HAVE_GDC = False


@functools.cache
def _supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: CUDA on compute capability 9.0+, not turned off."""
    if not HAVE_GDC or device.type != "cuda" or os.environ.get(ENV, "1").strip() == "0":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def launch_kwargs(device: torch.device) -> dict:
    """Extra launch arguments of a PDL kernel: its PDL constexpr, and Triton's launch attribute."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}


if HAVE_TRITON:

    @triton.jit
    def release(PDL: tl.constexpr):
        """Let the next kernel in the stream launch (once every program of this one has called it)."""
        if PDL:
            gdc_launch_dependents()

    @triton.jit
    def wait(PDL: tl.constexpr):
        """Block until the kernel before has finished and its writes are visible."""
        if PDL:
            gdc_wait()

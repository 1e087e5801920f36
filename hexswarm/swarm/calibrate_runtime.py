"""Time what the serving runtime adds to the kernels on this node, for the planner.

``calibrate.py`` times the model's kernels.  A pipeline of several stages on one host
also pays, per step and per stage, host work that a one-stage CUDA pipeline hides
behind the GPU: the stage engine receives the step, copies activations in, launches,
waits for its GPU, and hands the result to the next stage over a local link
(``runtime/local_link.py``).  Two quantities measure that, with the runtime's own code:

* ``stage_overhead`` [[rows, seconds], ...]: the node's real stage engines, two stages
  of the node's own checkpoint (its first two layers) handing steps to each other over a
  local link (each engine in its own process on CUDA, as a CUDA node runs them),
  ``micro_batches`` 1, decoding ``rows`` requests at once.  Seconds per step, minus the
  GPU time of the same two layers (measured by ``calibrate.measure``), halved: what one
  stage adds when its host waits for its GPU.  Per-step time comes from two runs of
  different lengths (prefill and start-up cancel out).
* ``stage_host`` (v3) [[rows, seconds], ...]: the same step time, halved, GPU time not
  taken off: a stage's host time per step.  On CUDA the two engines hand over on the GPU
  and neither host waits for it, so a 1-layer stage turns a step in its host time, and a
  stage of real size in max(host, GPU) (``batching_sim``).
* ``link_Bps``: activation bytes per second through ``write_message``/``read_message``
  over a Unix socket pair, from a device tensor to a device tensor (a prefill chunk's
  activations cross the link this way).

Both go into the calibration record beside the kernel timings (plan/calibration.py).
"""

from __future__ import annotations

import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

OVERHEAD_ROWS = (1, 8, 32)
SHORT, LONG = 8, 40  # new tokens of the two runs whose difference gives the step time
PROMPT_TEXT = "Calibrating the stage engine of this node"
REPEATS = 3
LINK_TOKENS = 2048  # one full step's prefill chunk
LINK_REPEATS = 3


def measure_link_Bps(hidden: int, device: str, dtype: str, tokens: int = LINK_TOKENS, repeats: int = LINK_REPEATS) -> float:
    """Bytes/s of an activation message [tokens, hidden] over a local-link socket, device to device."""
    import torch

    from hexswarm.runtime.local_link import SOCKET_BUFFER, read_message, write_message

    dev = torch.device(device)
    x = torch.zeros(tokens, hidden, dtype=getattr(torch, dtype), device=dev)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    times: list[float] = []
    try:
        for _ in range(repeats + 1):  # the first is a warm-up
            got: list[Any] = []
            reader = threading.Thread(target=lambda: got.append(read_message(b)["x"].to(dev)))
            start = time.perf_counter()
            reader.start()
            write_message(a, {"kind": "forward", "x": x})
            reader.join()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - start)
    finally:
        a.close()
        b.close()
    return x.numel() * x.element_size() / max(statistics.median(times[1:]), 1e-9)


def measure_stage_times(model_dir: Path, device: str, dtype: str, gpu_step_s: Callable[[int], float],
                        rows: tuple[int, ...] = OVERHEAD_ROWS, repeats: int = REPEATS) -> dict[str, list[list]]:
    """``stage_overhead`` and ``stage_host`` ([[rows, seconds], ...]) from the real engines of a two-stage
    pipeline; ``gpu_step_s(rows)``: the GPU time of one decode step of the same two layers (embedding, lm_head)."""
    from hexswarm.runtime.local_pipeline import LocalPipeline
    from hexswarm.runtime.stage_engine import EngineSettings

    links = tempfile.mkdtemp(prefix="hexswarm-cal-")  # private (0700): the link's trust rule
    pipe = LocalPipeline(model_dir, [(1, 1), (1, 1)], max_batch=max(rows), max_seq_len=LONG + 64,
                         settings=EngineSettings(micro_batches=1), device=device, dtype=dtype,
                         processes=device == "cuda", links_dir=links)
    counter = iter(range(1 << 30))

    def run(n: int, new_tokens: int) -> tuple[float, int]:
        """Wall seconds for n requests of new_tokens tokens, and the most tokens one of them got."""
        ids = [f"cal{next(counter)}" for _ in range(n)]
        start = time.perf_counter()
        for rid in ids:
            pipe.start(rid, PROMPT_TEXT, new_tokens)
        done = pipe.wait(n, timeout=300)
        return time.perf_counter() - start, max(len(m.get("tokens") or []) for m in done.values())

    overhead, host = [], []
    try:
        for r in rows:
            run(r, LONG)  # warm-up: CUDA graphs of this batch size, first link connections
            steps = []
            for _ in range(repeats):
                (t1, n1), (t2, n2) = run(r, SHORT), run(r, LONG)
                if n2 > n1:
                    steps.append((t2 - t1) / (n2 - n1))
            if steps:
                step = statistics.median(steps)
                overhead.append([r, max(1e-7, (step - gpu_step_s(r)) / 2)])
                host.append([r, max(1e-7, step / 2)])
    finally:
        pipe.close()
        shutil.rmtree(links, ignore_errors=True)
    return {"stage_overhead": overhead, "stage_host": host}

#!/usr/bin/env python3
"""Swarm throughput on one pipeline: 1 request at a time against N concurrent (batched decode,
stage pipelining), on a local swarm of node processes over libp2p on 127.0.0.1.

    python tools/bench_swarm.py [--nodes 2,1,1] [--concurrency 8] [--requests 16] [--new-tokens 32] [--json]

Reference measured in the same run: the same requests one at a time on the same pipeline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio  # noqa: E402

from hexswarm.model.tiny import TinySpec, make_tiny_llama  # noqa: E402
from hexswarm.launcher import LocalSwarm  # noqa: E402
from hexswarm.api.client import submit_to  # noqa: E402


async def run_batch(addrs: list[str], prompts: list[str], new_tokens: int, concurrency: int) -> tuple[float, int]:
    """Wall time and tokens generated for all prompts with at most `concurrency` in flight."""
    limiter = trio.CapacityLimiter(concurrency)
    tokens = 0

    async def one(i: int, prompt: str) -> None:
        nonlocal tokens
        async with limiter:
            final = await submit_to(addrs[i % len(addrs)], {"prompt": prompt, "max_new_tokens": new_tokens})
            tokens += len(final["done"]["tokens"])

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i, p in enumerate(prompts):
            nursery.start_soon(one, i, p)
    return time.perf_counter() - t0, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="2,1,1")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256, help="tiny model width (bigger: compute dominates)")
    ap.add_argument("--libp2p-only", action="store_true", help="pipeline frames over libp2p streams, not the direct path")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hexswarm-bench-"))
    model = make_tiny_llama(work / "model", TinySpec(layers=4, hidden=a.hidden, heads=8, kv_heads=4,
                                                     intermediate=4 * a.hidden, max_positions=1024))
    swarm = LocalSwarm(work / "nodes", model, [int(n) for n in a.nodes.split(",")],
                       serve_layout={"hetero_config": [2, 1], "pp_partition": [2, 2], "replicas": 1},
                       extra={"max_batch": max(8, a.concurrency), "direct_data_path": not a.libp2p_only})
    try:
        swarm.start()
        swarm.wait_layout(120)
        addrs = [n.addr for n in swarm.nodes]
        prompts = [f"Request number {i}: once upon a time" for i in range(a.requests)]
        trio.run(run_batch, addrs, prompts[:2], 4, 1)  # warm-up: connections, first allocations
        t1, n1 = trio.run(run_batch, addrs, prompts, a.new_tokens, 1)
        tc, nc = trio.run(run_batch, addrs, prompts, a.new_tokens, a.concurrency)
    finally:
        swarm.stop()
    out = {"data_path": "libp2p streams" if a.libp2p_only else "direct", "requests": a.requests, "new_tokens": a.new_tokens, "hidden": a.hidden,
           "sequential": {"seconds": round(t1, 3), "tokens_per_s": round(n1 / t1, 1)},
           f"concurrent_{a.concurrency}": {"seconds": round(tc, 3), "tokens_per_s": round(nc / tc, 1)},
           "speedup": round((nc / tc) / (n1 / t1), 2)}
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Time to first token with a kept connection against a new one per request (issue 12).

A local swarm of one node on a tiny model; N sequential streamed requests (a) each through a new
`submit_to` (a new client host: TCP connect, Noise handshake, yamux, then the stream), (b) all through
one `SwarmClient` (one dial before the clock runs; each request a new stream).  TTFT = request sent
to the first token frame.

    python tools/bench_client.py [--requests 20] [--new-tokens 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio  # noqa: E402

from hexswarm.api.client import SwarmClient, submit_to  # noqa: E402
from hexswarm.launcher import LocalSwarm  # noqa: E402
from hexswarm.model.tiny import TinySpec, make_tiny_llama  # noqa: E402


def _request(new_tokens: int, i: int) -> dict:
    return {"prompt": f"Request {i}: once upon a time", "max_new_tokens": new_tokens, "stream": True}


async def ttft_new_connection_each(addr: str, n: int, new_tokens: int) -> list[float]:
    out = []
    for i in range(n):
        first: list[float] = []
        t0 = time.perf_counter()
        await submit_to(addr, _request(new_tokens, i),
                        lambda f: first.append(time.perf_counter()) if "token" in f and not first else None)
        out.append(first[0] - t0)
    return out


async def ttft_one_client(addr: str, n: int, new_tokens: int) -> list[float]:
    out = []
    async with SwarmClient([addr]) as client:
        await client.connect(addr)  # the one handshake, before the clock
        for i in range(n):
            first: list[float] = []
            t0 = time.perf_counter()
            await client.submit(_request(new_tokens, i),
                                lambda f: first.append(time.perf_counter()) if "token" in f and not first else None)
            out.append(first[0] - t0)
    return out


def _stats(v: list[float]) -> dict:
    s = sorted(v)
    return {"p50_ms": round(statistics.median(s) * 1e3, 1), "mean_ms": round(statistics.mean(s) * 1e3, 1),
            "min_ms": round(s[0] * 1e3, 1), "max_ms": round(s[-1] * 1e3, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="hexswarm-bench-client-"))
    model = make_tiny_llama(work / "model", TinySpec(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128))
    swarm = LocalSwarm(work / "nodes", model, [1], serve_layout={"hetero_config": [1], "pp_partition": [2], "replicas": 1})
    try:
        swarm.start()
        swarm.wait_layout(120)
        addr = swarm.nodes[0].addr
        trio.run(ttft_one_client, addr, 2, 2)  # warm-up: the node's first allocations
        # interleaved rounds, so drift in the machine's load hits both the same
        fresh, kept = [], []
        for _ in range(2):
            fresh += trio.run(ttft_new_connection_each, addr, a.requests // 2, a.new_tokens)
            kept += trio.run(ttft_one_client, addr, a.requests // 2, a.new_tokens)
    finally:
        swarm.stop()
    out = {"requests": len(fresh), "new_submit_to_each": _stats(fresh), "one_swarm_client": _stats(kept)}
    out["p50_saved_ms"] = round(out["new_submit_to_each"]["p50_ms"] - out["one_swarm_client"]["p50_ms"], 1)
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

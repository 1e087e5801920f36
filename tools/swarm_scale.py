#!/usr/bin/env python3
"""How a swarm of N membership-only nodes converges: N node processes on 127.0.0.1 (CPU config, no
model), every one bootstrapped to the first; one client host polls every node's /hexswarm/peers/1
once a second (one call per node, no new process per poll).

    python tools/swarm_scale.py --nodes 32 [--heartbeat 2] [--settle 20] [--bootstrap hub|tree] [--json]

Reports: seconds from "all N processes listen" until every node's table lists all N up; inventory
gossip messages received per node per second (the nodes' own counters, over --settle seconds after
convergence); resident memory per node (/proc, mean and max).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio  # noqa: E402

from hexswarm.swarm.launcher import NodeProcess, free_port, write_node_config  # noqa: E402

STARTUP_TIMEOUT_S = 300.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def measure(addrs: list[str], timeout_s: float, settle_s: float) -> dict:
    import multiaddr

    from hexswarm.net import identity
    from hexswarm.net.host import dial, make_host, parse_peer_multiaddr
    from hexswarm.net.protocols import PEERS, RequestError, request

    infos = [parse_peer_multiaddr(a) for a in addrs]
    host = make_host(identity.generate())
    n = len(addrs)
    replies: list[dict] = [{} for _ in addrs]

    async def poll() -> None:
        async def one(i: int) -> None:
            try:
                await dial(host, infos[i])
                replies[i] = await request(host, infos[i].peer_id, PEERS, {}, timeout=10)
            except (ConnectionError, RequestError):
                replies[i] = {}

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)

    def up_counts() -> list[int]:
        return [sum(p["state"] == "up" for p in r.get("peers", [])) for r in replies]

    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        start = time.monotonic()
        converged_s = None
        while time.monotonic() - start < timeout_s:
            await poll()
            if min(up_counts()) == n:
                converged_s = time.monotonic() - start
                break
            await trio.sleep(1.0)
        first = [r.get("stats", {}).get("gossip_in", 0) for r in replies]
        t0 = time.monotonic()
        await trio.sleep(settle_s)
        await poll()
        elapsed = time.monotonic() - t0
        rates = [(r.get("stats", {}).get("gossip_in", 0) - f) / elapsed for r, f in zip(replies, first) if r]
        return {"converged_s": None if converged_s is None else round(converged_s, 1),
                "min_up_seen": min(up_counts()),
                "median_up_seen": statistics.median([c for c, r in zip(up_counts(), replies) if r] or [0]),
                "unanswered": [i for i, r in enumerate(replies) if not r],
                "gossip_in_per_node_s": round(statistics.mean(rates), 1) if rates else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--heartbeat", type=float, default=2.0, help="heartbeat_s of every node")
    ap.add_argument("--probe", type=float, default=5.0, help="probe_s of every node (all-pairs pings)")
    ap.add_argument("--timeout", type=float, default=300.0, help="give up on convergence after this long")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds of gossip counted after convergence")
    ap.add_argument("--bootstrap", choices=("hub", "tree"), default="hub",
                    help="hub: every node bootstraps to node 0; tree: node i to node (i-1)//2 (no single hub)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.nodes < 2:
        sys.exit("error: --nodes must be at least 2")
    timings = {"heartbeat_s": args.heartbeat, "down_after_s": 5 * args.heartbeat, "drop_after_s": 60 * args.heartbeat,
               "probe_s": args.probe, "probe_bytes": 16384, "calibrate": False, "log_level": "info"}
    nodes: list[NodeProcess] = []
    with tempfile.TemporaryDirectory(prefix="swarm_scale") as tmp:
        try:
            for i in range(args.nodes):
                nodes.append(NodeProcess(write_node_config(Path(tmp), f"n{i}", swarm="scale", **timings)))
            t_launch = time.monotonic()
            for node in nodes:  # ports known before start: every node starts at once
                node.port = free_port()
            for i, node in enumerate(nodes):
                node.start([] if i == 0 else [nodes[0 if args.bootstrap == "hub" else (i - 1) // 2].addr])
            for node in nodes:
                node.wait_listening(STARTUP_TIMEOUT_S)
            startup_s = time.monotonic() - t_launch
            result = trio.run(measure, [n.addr for n in nodes], args.timeout, args.settle)
            rss = [rss_mib(n.proc.pid) for n in nodes if n.alive()]
            for i in result["unanswered"]:
                print(f"node {i} did not answer (alive: {nodes[i].alive()}); its log ends:\n{nodes[i].log()[-1500:]}",
                      file=sys.stderr)
        finally:
            for node in nodes:
                node.send_signal(signal.SIGTERM)
            for node in nodes:
                node.kill(signal.SIGTERM)
    result.update(nodes=args.nodes, bootstrap=args.bootstrap, heartbeat_s=args.heartbeat, probe_s=args.probe, startup_s=round(startup_s, 1),
                  rss_mib_mean=round(statistics.mean(rss), 1), rss_mib_max=round(max(rss), 1),
                  gossip_in_per_node_heartbeat=None if result["gossip_in_per_node_s"] is None
                  else round(result["gossip_in_per_node_s"] * args.heartbeat, 2))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:32s} {v}")


if __name__ == "__main__":
    main()

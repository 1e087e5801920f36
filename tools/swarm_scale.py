#!/usr/bin/env python3
"""How a swarm of N membership-only nodes converges: N node processes on 127.0.0.1 (CPU config, no
model), all started at once.  Each node's table is followed in its own log (the "peer P joined / is
down" lines it writes anyway), so watching costs the nodes nothing; one client host asks every node
for its counters (/hexswarm/peers/1 with {"summary": true}) at the start and the end of the settle
window, two requests per node in all.

    python3 tools/swarm_scale.py --nodes 32 [--timeout 240] [--settle 20] [--bootstrap multi|hub|tree]
                                 [--heartbeat 2] [--heartbeat-peers 16] [--out FILE] [--logs DIR] [--json]

Reports: seconds from "all N processes listen" until every node's table lists all N up; inventory
records received per node per second and CPU seconds per node per second (the nodes' own counters,
over --settle seconds after convergence, or after the convergence budget ran out); the heartbeat in
force and the size of each node's record; resident memory per node (/proc, mean and max); the machine
(cores this process may use, load average).  --timeout bounds the whole run: start, convergence and
the settle window all fit in it (the nodes are stopped after).  Runs from a checkout with python3 and
py-libp2p installed; the nodes are started with the same interpreter and the checkout on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# the node processes import hexswarm from this checkout, wherever the tool is started from
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

import trio  # noqa: E402

from hexswarm.launcher import NodeProcess, free_port, write_node_config  # noqa: E402

LOG_READ_S = 0.25
POLL_BUDGET_S = 20.0  # one round of counter requests to every node
# kept out of the convergence budget: the two rounds of counter requests and stopping N nodes
TEARDOWN_S = 2 * POLL_BUDGET_S + 15.0


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a local process (/proc), None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def stop(nodes: list[NodeProcess], grace_s: float = 10.0) -> None:
    """SIGTERM to every node at once, SIGKILL to those still running after `grace_s` (the whole teardown
    is bounded, however many nodes are slow to stop)."""
    for node in nodes:
        node.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(node.alive() for node in nodes):
        time.sleep(0.2)
    for node in nodes:
        if node.alive():
            node.send_signal(signal.SIGKILL)
    for node in nodes:
        if node.proc is not None:
            try:
                node.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


def bootstrap_of(i: int, how: str) -> list[int]:
    """The nodes node i joins through: hub: node 0; tree: its parent (i-1)//2; multi: up to three earlier
    nodes (i-1, (i-1)//2, (i-1)//4), so no node is everyone's way in and no single dead peer cuts one off."""
    if i == 0:
        return []
    if how == "hub":
        return [0]
    if how == "tree":
        return [(i - 1) // 2]
    return sorted({i - 1, (i - 1) // 2, (i - 1) // 4})


def machine() -> dict:
    out = {"cpu_count": os.cpu_count(), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        out["cores_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        out["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["commit"] = None
    try:
        from importlib.metadata import version

        out["libp2p"] = version("libp2p")
    except Exception:
        out["libp2p"] = None
    out["python"] = sys.version.split()[0]
    return out


class LogTables:
    """Every node's view of the swarm, read from its own log ("peer P joined / is up / is back up / is down /
    dropped" lines, as the node writes them): no request to the nodes, so watching costs them nothing."""

    EVENT = re.compile(r"hexswarm\.node: peer (\S+) (joined|is up|is back up|is down|dropped)")

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.offsets = [0] * len(paths)
        self.partial = [""] * len(paths)
        self.up: list[set[str]] = [set() for _ in paths]
        self.downs = 0  # "is down" lines read so far, all nodes

    def read(self) -> list[int]:
        """Read what the logs gained; each node's count of peers up, itself included."""
        for i, path in enumerate(self.paths):
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets[i])
                    data = f.read()
            except OSError:
                continue
            self.offsets[i] += len(data)
            text = self.partial[i] + data.decode(errors="replace")
            lines = text.split("\n")
            self.partial[i] = lines.pop()
            for line in lines:
                m = self.EVENT.search(line)
                if m:
                    self.downs += m.group(2) == "is down"
                    (self.up[i].add if m.group(2) in ("joined", "is up", "is back up") else self.up[i].discard)(m.group(1))
        return [len(u) + 1 for u in self.up]


async def measure(addrs: list[str], logs: list[Path], pids: list[int], deadline: float, settle_s: float) -> dict:
    import multiaddr

    from hexswarm.net import identity
    from hexswarm.net.host import dial, make_host, parse_peer_multiaddr
    from hexswarm.net.protocols import PEERS, RequestError, request

    infos = [parse_peer_multiaddr(a) for a in addrs]
    host = make_host(identity.generate())
    n = len(addrs)
    replies: list[dict] = [{} for _ in addrs]
    tables = LogTables(logs)

    async def poll() -> None:
        async def one(i: int) -> None:
            replies[i] = {}
            for _ in range(3):  # a loaded node may miss one
                try:
                    await dial(host, infos[i])
                    replies[i] = await request(host, infos[i].peer_id, PEERS, {"summary": True}, timeout=10)
                    return
                except (ConnectionError, RequestError):
                    await trio.sleep(1.0)

        with trio.move_on_after(POLL_BUDGET_S):  # starved nodes must not hold the run past its timeout
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)

    def up(r: dict) -> int:
        if "up" in r:
            return int(r["up"])
        return sum(p["state"] == "up" for p in r.get("peers", []))  # a node without summaries

    def stat(r: dict, key: str) -> float | None:
        value = r.get("stats", {}).get(key)
        return None if value is None else float(value)

    start = time.monotonic()
    converged_s = None
    trace = []  # [seconds, min up, median up], once a second, from the logs
    while time.monotonic() < deadline:
        counts = tables.read()
        now = time.monotonic() - start
        if not trace or now - trace[-1][0] >= 1.0:
            trace.append([round(now, 1), min(counts), statistics.median(counts)])
        if min(counts) >= n:
            converged_s = now
            trace.append([round(now, 1), min(counts), statistics.median(counts)])
            break
        await trio.sleep(LOG_READ_S)
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        # the nodes' counters at the start and the end of the settle window: two requests per node in all
        await poll()
        first = [dict(r) for r in replies]
        cpu0, t0 = [cpu_seconds(p) for p in pids], time.monotonic()
        tables.read()
        downs0, low = tables.downs, n
        while time.monotonic() - t0 < settle_s:  # stability: how often a peer is seen down meanwhile
            await trio.sleep(LOG_READ_S)
            low = min(low, *tables.read())
        cpu1, elapsed = [cpu_seconds(p) for p in pids], time.monotonic() - t0
        await poll()
    counts = [up(r) for r in replies]
    both = [(a, b) for a, b in zip(first, replies) if a and b]

    def rate(key: str) -> list[float]:
        return [(stat(b, key) - stat(a, key)) / elapsed for a, b in both
                if stat(a, key) is not None and stat(b, key) is not None]

    gossip = rate("gossip_in")
    # CPU from /proc where the nodes run here, else from their own counters
    cpu = [(b - a) / elapsed for a, b in zip(cpu0, cpu1) if a is not None and b is not None] or rate("cpu_s")
    heartbeats = [stat(r, "heartbeat_s") for r in replies if stat(r, "heartbeat_s") is not None]
    record_bytes = [stat(r, "record_bytes") for r in replies if stat(r, "record_bytes")]
    return {"converged_s": None if converged_s is None else round(converged_s, 1),
            "min_up_seen": min(counts),
            "median_up_seen": statistics.median([c for c, r in zip(counts, replies) if r] or [0]),
            "unanswered": [i for i, r in enumerate(replies) if not r],
            "settle_s": round(elapsed, 1),
            # during the settle window, from the logs: "peer is down" events (all nodes) and the fewest
            # peers up any node listed at any moment
            "down_events_settle": tables.downs - downs0,
            "min_up_settle": low,
            "gossip_in_per_node_s": round(statistics.mean(gossip), 2) if gossip else None,
            "cpu_per_node": round(statistics.mean(cpu), 4) if cpu else None,
            "cpu_per_node_max": round(max(cpu), 4) if cpu else None,
            "cpu_all_nodes": round(statistics.mean(cpu) * n, 3) if cpu else None,  # the mean node's, times N
            "nodes_counted": len(cpu),
            "heartbeat_in_force_s": statistics.median(heartbeats) if heartbeats else None,
            "record_bytes_mean": round(statistics.mean(record_bytes)) if record_bytes else None,
            "up_trace": trace}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=240.0,
                    help="seconds for the whole run (start, convergence, settle window); nodes are stopped after")
    ap.add_argument("--settle", type=float, default=20.0,
                    help="seconds over which gossip and CPU are counted once converged (or out of time)")
    ap.add_argument("--bootstrap", choices=("multi", "hub", "tree"), default="multi",
                    help="multi: node i joins through nodes i-1, (i-1)//2, (i-1)//4; hub: every node through node 0; "
                         "tree: node i through node (i-1)//2")
    ap.add_argument("--heartbeat", type=float, default=2.0, help="heartbeat_s of every node (down_after_s is 5x, "
                                                                 "drop_after_s 60x)")
    ap.add_argument("--heartbeat-peers", type=int, default=None,
                    help="heartbeat_peers of every node (the node's default when not given; 0: the heartbeat never "
                         "slows with the swarm's size)")
    ap.add_argument("--probe", type=float, default=5.0, help="probe_s of every node")
    ap.add_argument("--out", type=Path, help="also write the JSON result to this file")
    ap.add_argument("--logs", type=Path, help="copy every node's log into this folder (n<i>.log) at the end")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = ap.parse_args()
    if args.nodes < 2:
        sys.exit("error: --nodes must be at least 2")
    if args.timeout <= args.settle + TEARDOWN_S:
        sys.exit(f"error: --timeout must exceed --settle + {TEARDOWN_S:g} s")
    t_launch = time.monotonic()
    deadline = t_launch + args.timeout - TEARDOWN_S
    timings = {"heartbeat_s": args.heartbeat, "down_after_s": 5 * args.heartbeat, "drop_after_s": 60 * args.heartbeat,
               "probe_s": args.probe, "probe_bytes": 16384, "calibrate": False, "log_level": "info"}
    if args.heartbeat_peers is not None:
        timings["heartbeat_peers"] = args.heartbeat_peers
    else:  # the nodes' default (None: a checkout from before the key)
        from hexswarm.swarm.config import NodeConfig

        args.heartbeat_peers = getattr(NodeConfig(), "heartbeat_peers", None)
    result: dict = {"nodes": args.nodes, "bootstrap": args.bootstrap, "heartbeat_s": args.heartbeat,
                    "heartbeat_peers": args.heartbeat_peers, "probe_s": args.probe, "timeout_s": args.timeout,
                    "machine": machine(), "load_avg_start": os.getloadavg()[0]}
    nodes: list[NodeProcess] = []
    with tempfile.TemporaryDirectory(prefix="swarm_scale") as tmp:
        try:
            for i in range(args.nodes):
                nodes.append(NodeProcess(write_node_config(Path(tmp), f"n{i}", swarm="scale", **timings)))
            for node in nodes:  # ports known before start: every node starts at once
                node.port = free_port()
            for i, node in enumerate(nodes):
                node.start([nodes[j].addr for j in bootstrap_of(i, args.bootstrap)])
            try:
                for node in nodes:
                    node.wait_listening(max(1.0, deadline - args.settle - time.monotonic()))
            except (TimeoutError, RuntimeError) as e:
                result["error"] = f"not every node started: {str(e).splitlines()[0]}"
                result["listening"] = sum("listening on" in n.log() for n in nodes)
            else:
                result["startup_s"] = round(time.monotonic() - t_launch, 1)
                result.update(trio.run(measure, [n.addr for n in nodes], [n.log_path for n in nodes],
                                               [n.proc.pid for n in nodes], deadline - args.settle,
                                               args.settle))
            rss = [rss_mib(n.proc.pid) for n in nodes if n.alive()]
            result.update(rss_mib_mean=round(statistics.mean(rss), 1) if rss else None,
                          rss_mib_max=round(max(rss), 1) if rss else None,
                          alive_at_end=sum(n.alive() for n in nodes))
            for i in result.get("unanswered", []):
                print(f"node {i} did not answer (alive: {nodes[i].alive()}); its log ends:\n{nodes[i].log()[-1500:]}",
                      file=sys.stderr)
        finally:
            stop(nodes)
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for i, node in enumerate(nodes):
                    if node.log_path.exists():
                        shutil.copyfile(node.log_path, args.logs / f"n{i}.log")
    result["load_avg_end"] = os.getloadavg()[0]
    result["wall_s"] = round(time.monotonic() - t_launch, 1)
    if result.get("gossip_in_per_node_s") is not None and result.get("heartbeat_in_force_s"):
        # records per heartbeat in force: N-1 when every record arrives
        result["gossip_in_per_node_heartbeat"] = round(result["gossip_in_per_node_s"] * result["heartbeat_in_force_s"], 2)
    text = json.dumps(result)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        for k, v in result.items():
            if k != "up_trace":
                print(f"{k:32s} {v}")


if __name__ == "__main__":
    main()

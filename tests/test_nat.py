"""Peers behind NATs (network namespaces, iptables MASQUERADE; root only, skipped otherwise).

Two LANs, each behind its own NAT router, and public relays: the NATed nodes know only a relay's
address, reserve slots on the relays, see each other up, and serve one pipeline across the NATs,
token for token equal to `generate`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import run_cli
from hexswarm.swarm.launcher import NodeProcess, wait_for, write_node_config
from natnet import nat_net
from netutil import FAST, REPO, STARTUP_TIMEOUT_S
from swarmutil import reference

pytestmark = pytest.mark.slow
NEW = 12
PINNED = {"hetero_config": [1, 1], "pp_partition": [2, 2], "replicas": 1}
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def in_ns(net, ns: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*net.exec_prefix(ns), sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=REPO)


def query_in(net, ns: str, addr: str) -> dict:
    run = in_ns(net, ns, str(REPO / "tests" / "netutil.py"), "query", addr)
    return json.loads(run.stdout).get(addr, {}) if run.returncode == 0 else {}


def views(net, placed: list[tuple[str, NodeProcess]]) -> dict[str, dict]:
    """Each node's peer table (PeerID -> view), asked from inside the node's own namespace."""
    return {n.peer_id: {p["peer_id"]: p for p in query_in(net, ns, n.addr).get("peers", [])} for ns, n in placed}


@pytest.fixture
def natted(tmp_path, tiny_model):
    """Relays R0, R1 on the public segment; A and B each behind its own NAT, serving two stages."""
    net = nat_net(public_hosts=2, lans=2)
    nodes: list[NodeProcess] = []
    try:
        def node(name, ns, ip, **keys):
            config = write_node_config(tmp_path, name, **{**FAST, "swarm": "nat", **keys})
            n = NodeProcess(config, ip=ip, port=4001, prefix=net.exec_prefix(ns))
            nodes.append(n)
            return n

        relays = [node(f"R{i}", net.public[i], net.public_ip(i), roles=["relay"]) for i in range(2)]
        serving = {"model": str(tiny_model), "roles": ["head", "worker"], "serve_layout": PINNED,
                   "dispatch_wait_s": 10.0}
        a = node("A", net.lans[0], net.lan_ip(0), **serving)
        b = node("B", net.lans[1], net.lan_ip(1), **serving)
        relays[0].start().wait_listening(STARTUP_TIMEOUT_S)
        relays[1].start([relays[0].addr]).wait_listening(STARTUP_TIMEOUT_S)
        for n in (a, b):
            n.start([relays[0].addr])
        for n in (a, b):
            n.wait_listening(STARTUP_TIMEOUT_S)
        yield net, relays, a, b
    finally:
        for n in nodes:
            n.kill()
        net.delete()


def test_natted_peers_join_through_relays_and_serve_a_pipeline(natted, tiny_model):
    net, relays, a, b = natted
    placed = [(net.public[0], relays[0]), (net.public[1], relays[1]), (net.lans[0], a), (net.lans[1], b)]
    everyone = {n.peer_id for _, n in placed}
    seen: dict = {}

    def all_up() -> bool:
        seen.update(views(net, placed))
        return all(set(v) == everyone and all(p["state"] == "up" for p in v.values()) for v in seen.values())

    assert wait_for(all_up, 60), {k: {p: v["state"] for p, v in t.items()} for k, t in seen.items()}
    # A and B are reachable only through the relays: their records carry relayed addresses
    a_addrs = seen[b.peer_id][a.peer_id]["addrs"]
    assert any(f"/p2p/{relays[0].peer_id}/p2p-circuit/p2p/{a.peer_id}" in x for x in a_addrs), a_addrs
    assert not any(x.startswith(f"/ip4/{net.public_ip(0)}/") for x in seen[a.peer_id][a.peer_id]["addrs"]
                   if "p2p-circuit" not in x)
    # the planner's network matrix has the relayed link measured
    assert wait_for(lambda: (views(net, placed)[a.peer_id][a.peer_id]["links"] or {}).get(b.peer_id), 20)

    def committed() -> bool:
        st = in_ns(net, net.lans[0], "-m", "hexswarm", "status", "--peer", a.addr, "--json")
        return st.returncode == 0 and (json.loads(st.stdout).get("layout") or {}).get("epoch") is not None

    assert wait_for(committed, 90, 1.0), a.log()[-3000:] + b.log()[-3000:]
    run = in_ns(net, net.lans[0], "-m", "hexswarm", "submit", "--peer", a.addr, "--prompt", "Hello, world!",
                "--max-new-tokens", str(NEW), "--json", timeout=180)
    assert run.returncode == 0, run.stderr + a.log()[-3000:] + b.log()[-3000:]
    out = json.loads(run.stdout)
    ref = reference(tiny_model, "Hello, world!", NEW)
    assert out["tokens"] == ref["tokens"]
    assert out["layout"] == {"hetero_config": [1, 1], "pp_partition": [2, 2]}

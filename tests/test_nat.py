"""Peers behind NATs (network namespaces, iptables MASQUERADE; root only, skipped otherwise).

Two LANs, each behind its own NAT router, and public relays: the NATed nodes know only a relay's
address, reserve slots on the relays, see each other up, and serve one pipeline across the NATs,
token for token equal to `generate`; then the relay that carries the pipeline is killed mid-generation
and the request still completes, each token once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import run_cli
from hexswarm.launcher import NodeProcess, wait_for, write_node_config
from natnet import nat_net
from netutil import FAST, REPO, STARTUP_TIMEOUT_S
from swarmutil import reference

pytestmark = pytest.mark.slow
NEW = 12
LONG = 100  # tokens: the relay dies while they are being generated
RECOVERY_S = 150
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
            # down after 6 s, not 2: relayed records arrive late on a loaded machine, and a flapping
            # peer table un-plans the layout before the relay is even killed (seen at load average 17)
            config = write_node_config(tmp_path, name, **{**FAST, "down_after_s": 6.0, "swarm": "nat", **keys})
            n = NodeProcess(config, ip=ip, port=4001, prefix=net.exec_prefix(ns))
            nodes.append(n)
            return n

        relays = [node(f"R{i}", net.public[i], net.public_ip(i), roles=["relay"]) for i in range(2)]
        # local_links off: A and B share this machine's filesystem, and stage engines of one host would
        # hand steps to each other over Unix sockets, past the NATs
        # hole_punch off: these routers answer unsolicited SYNs with a reset, so no punch can succeed
        # here, and in one run the failed attempts left A unable to open streams to B (net.md)
        serving = {"model": str(tiny_model), "roles": ["head", "worker"], "serve_layout": PINNED,
                   "dispatch_wait_s": 10.0, "local_links": False, "hole_punch": False}
        a = node("A", net.lans[0], net.lan_ip(0), **serving)
        b = node("B", net.lans[1], net.lan_ip(1), **serving)
        relays[0].start().wait_listening(STARTUP_TIMEOUT_S)
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
    placed = [(net.public[0], relays[0]), (net.lans[0], a), (net.lans[1], b)]
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
    assert wait_for(lambda: (views(net, placed)[a.peer_id][a.peer_id]["links"] or {}).get(b.peer_id), 20), \
        views(net, placed)[a.peer_id][b.peer_id]

    out = _submit_once_committed(net, a, b, 90)
    ref = reference(tiny_model, "Hello, world!", NEW)
    assert out["tokens"] == ref["tokens"]
    assert out["layout"] == {"hetero_config": [1, 1], "pp_partition": [2, 2]}

    # A second relay joins; then the first, which carries every connection between A and B, dies
    # mid-generation.  A and B meet again through the second; the request completes, token for token,
    # each token once (resumed where frames were lost).
    relays[1].start([relays[0].addr]).wait_listening(STARTUP_TIMEOUT_S)
    via_r1 = f"/p2p/{relays[1].peer_id}/p2p-circuit/p2p/{a.peer_id}"
    assert wait_for(lambda: any(via_r1 in x for x in views(net, placed)[b.peer_id][a.peer_id]["addrs"]), 120), \
        a.log()[-3000:]
    ref = reference(tiny_model, "Once upon a time", LONG)
    client = subprocess.Popen([*net.exec_prefix(net.lans[0]), sys.executable, str(REPO / "tests" / "netutil.py"),
                               "submit", a.addr, "Once upon a time", str(LONG)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    try:
        frames = []
        for line in client.stdout:
            frames.append(json.loads(line))
            if "token" in frames[-1] or "batch" in frames[-1]:
                break
        relays[0].kill()
        killed = time.monotonic()
        before = len(frames)
        out, err = client.communicate(timeout=RECOVERY_S)
    finally:
        client.kill()
    frames += [json.loads(line) for line in out.splitlines()]
    done = frames[-1].get("done")
    print(f"relay killed: request done {time.monotonic() - killed:.1f} s later, attempt {done and done['attempts']}")
    assert done, f"{frames[-1]} {err[-2000:]}" + a.log()[-4000:] + b.log()[-4000:]
    assert done["tokens"] == ref["tokens"]
    streamed = [f for frame in frames for f in frame.get("batch", [frame]) if "token" in f]
    assert [f["index"] for f in streamed] == list(range(LONG))  # each token once, in order
    assert [f["token"] for f in streamed] == ref["tokens"]
    assert len([f for frame in frames[:before] for f in frame.get("batch", [frame]) if "token" in f]) < LONG


def _submit_once_committed(net, a, b, wait_s: float) -> dict:
    """Once A's status shows a committed layout (within wait_s), "Hello, world!" submitted to A from A's LAN:
    the submit's JSON output."""
    def committed() -> bool:
        st = in_ns(net, net.lans[0], "-m", "hexswarm", "status", "--peer", a.addr, "--json")
        return st.returncode == 0 and (json.loads(st.stdout).get("layout") or {}).get("epoch") is not None

    assert wait_for(committed, wait_s, 1.0), a.log()[-3000:] + b.log()[-3000:]
    run = in_ns(net, net.lans[0], "-m", "hexswarm", "submit", "--peer", a.addr, "--prompt", "Hello, world!",
                "--max-new-tokens", str(NEW), "--json", timeout=180)
    assert run.returncode == 0, run.stderr + a.log()[-3000:] + b.log()[-3000:]
    return json.loads(run.stdout)


def _relay_and_two_natted(net, tmp_path, swarm: str, keys: dict, nodes: list) -> tuple:
    """Relay R on the public segment, A and B (with `keys`) each behind its own NAT, joined through R; each is
    appended to `nodes` as it is made (the caller kills them)."""
    for name, ns, ip, extra in [("R", net.public[0], net.public_ip(0), {"roles": ["relay"]}),
                                ("A", net.lans[0], net.lan_ip(0), keys), ("B", net.lans[1], net.lan_ip(1), keys)]:
        config = write_node_config(tmp_path, name, **{**FAST, "swarm": swarm, **extra})
        nodes.append(NodeProcess(config, ip=ip, port=4001, prefix=net.exec_prefix(ns)))
    relay, a, b = nodes
    relay.start().wait_listening(STARTUP_TIMEOUT_S)
    for n in (a, b):
        n.start([relay.addr])
    for n in (a, b):
        n.wait_listening(STARTUP_TIMEOUT_S)
    return relay, a, b


def test_hole_punching_upgrades_a_relayed_connection_and_a_pipeline_runs_over_it(tmp_path, tiny_model):
    """Behind routers that drop unsolicited SYNs, A and B first meet through the relay, then DCUtR (py-libp2p)
    punches a direct connection between them.  B's IP on A's punched connection is B's NAT's, which B does not
    list and where no punch opened its data port: the pipe tries the direct path there for 2 s only (a 1:1 NAT
    would connect at once), then uses the libp2p stream, instead of waiting out open_direct's 5 s on every link.
    (One test for both: each namespace swarm costs about a minute of the suite.)"""
    net = nat_net(public_hosts=1, lans=2, drop_unsolicited=True)
    nodes: list[NodeProcess] = []
    serving = {"model": str(tiny_model), "roles": ["head", "worker"], "serve_layout": PINNED,
               "dispatch_wait_s": 10.0, "local_links": False, "down_after_s": 6.0}
    try:
        relay, a, b = _relay_and_two_natted(net, tmp_path, "punchpipe", serving, nodes)
        placed = [(net.lans[0], a), (net.lans[1], b)]

        def punched() -> bool:
            v = views(net, placed)
            return all(v.get(x.peer_id, {}).get(y.peer_id, {}).get("route") == "direct" for x, y in ((a, b), (b, a)))

        assert wait_for(punched, 120, 1.0), a.log()[-3000:] + b.log()[-3000:]
        assert "through a relay" in a.log() + b.log()  # they met through the relay first

        out = _submit_once_committed(net, a, b, 120)
        assert out["tokens"] == reference(tiny_model, "Hello, world!", NEW)["tokens"]
        logs = a.log() + b.log()
        assert "which it does not list" in logs, logs[-4000:]  # the punched connection was seen for what it is
        assert "trying the direct path for 2 s only" in logs  # a short try, not open_direct's 5 s
        assert "direct encrypted path" not in logs
    finally:
        for n in nodes:
            n.kill()
        net.delete()

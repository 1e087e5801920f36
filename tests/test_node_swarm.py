"""Acceptance: real node processes on 127.0.0.1 find each other, notice deaths and returns, keep outsiders out."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from netutil import FAST, JOIN_DEADLINE_S, NODE_MAIN, REPO, NodeProcess, all_see, check_chain, free_port, query, states, wait_for, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def nodes():
    started: list[NodeProcess] = []
    yield started
    for n in started:
        n.kill()


def test_chain_of_four_join_down_and_back(tmp_path, nodes):
    nodes.extend(NodeProcess(write_config(tmp_path, name)) for name in "ABCD")
    check_chain(nodes, query)


def test_other_swarm_and_unlisted_peer_never_appear(tmp_path, nodes):
    a_cfg, b_cfg = write_config(tmp_path, "A"), write_config(tmp_path, "B")
    a, b = NodeProcess(a_cfg), NodeProcess(b_cfg)
    allow = [a.peer_id, b.peer_id]
    write_config(tmp_path, "A", allow_peers=allow)
    write_config(tmp_path, "B", allow_peers=allow)
    nodes.append(a.start().wait_listening())
    nodes.append(b.start([a.addr]))
    outsider = NodeProcess(write_config(tmp_path, "E"))  # same swarm, not allowlisted
    other = NodeProcess(write_config(tmp_path, "O", swarm="elsewhere"))
    nodes.append(outsider.start([a.addr]))
    nodes.append(other.start([a.addr]))
    for n in nodes:
        n.wait_listening()

    # The outsider (no allowlist of its own) hears A and B: gossip flows.
    assert wait_for(lambda: all_see(query([outsider.addr]), {a.peer_id: "up", b.peer_id: "up"}), JOIN_DEADLINE_S)
    assert wait_for(lambda: all_see(query([a.addr, b.addr]), {a.peer_id: "up", b.peer_id: "up"}), JOIN_DEADLINE_S)
    # Several more heartbeats: outsiders still absent from A and B.
    for _ in range(6):
        for reply in query([a.addr, b.addr]).values():
            assert set(states(reply)) == {a.peer_id, b.peer_id}
        wait_for(lambda: False, FAST["heartbeat_s"])
    # The other swarm never sees this swarm's nodes either.
    assert set(states(query([other.addr])[other.addr])) == {other.peer_id}


def test_bootstrap_peer_that_starts_late_is_joined(tmp_path, nodes):
    a = NodeProcess(write_config(tmp_path, "A"), port=free_port())  # B must know A's address before A runs
    b = NodeProcess(write_config(tmp_path, "B", bootstrap_timeout_s=30.0))
    nodes.append(b.start([a.addr]))
    assert wait_for(lambda: "unreachable" in b.log(), 20, 0.1)  # B has failed to dial A at least once
    nodes.append(a.start().wait_listening())
    assert wait_for(lambda: all_see(query([a.addr, b.addr]), {a.peer_id: "up", b.peer_id: "up"}), JOIN_DEADLINE_S)


def test_unreachable_bootstrap_exits_with_one_line(tmp_path):
    from hexswarm.net.identity import generate

    ghost = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{generate().peer_id}"
    cfg = write_config(tmp_path, "lonely", bootstrap=[ghost], bootstrap_timeout_s=2.0)
    run = subprocess.run(
        [sys.executable, "-c", NODE_MAIN, "node", "--config", str(cfg), "--listen", f"/ip4/127.0.0.1/tcp/{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach bootstrap peer") and "no other peer is known" in last


def test_peers_cli_json_dead_bootstrap_warning_and_clean_sigterm(tmp_path, nodes):
    a = NodeProcess(write_config(tmp_path, "A"))
    b = NodeProcess(write_config(tmp_path, "B"))
    nodes.append(a.start().wait_listening())
    from hexswarm.net.identity import generate

    ghost = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{generate().peer_id}"
    nodes.append(b.start([a.addr, ghost]).wait_listening())  # one bootstrap peer answers, one never does
    assert wait_for(lambda: all_see(query([a.addr]), {a.peer_id: "up", b.peer_id: "up"}), JOIN_DEADLINE_S)

    def b_probed() -> bool:
        return any(p["peer_id"] == b.peer_id and p["latency_ms"] is not None for p in query([a.addr])[a.addr]["peers"])

    assert wait_for(b_probed, 3 * FAST["probe_s"])

    run = subprocess.run(
        [sys.executable, "-c", NODE_MAIN, "peers", "--peer", a.addr, "--json"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    peers = {p["peer_id"]: p for p in json.loads(run.stdout)}
    assert set(peers) == {a.peer_id, b.peer_id}
    for field in ("peer_id", "addrs", "devices", "state", "last_seen_s", "latency_ms"):
        assert all(field in p for p in peers.values())
    assert peers[b.peer_id]["devices"][0]["name"] == "test-cpu"
    assert peers[b.peer_id]["addrs"] == [b.addr]

    table = subprocess.run(
        [sys.executable, "-c", NODE_MAIN, "peers", "--peer", a.addr], capture_output=True, text=True, timeout=60
    )
    assert table.returncode == 0 and "PeerID" in table.stdout

    # The dead bootstrap peer only warns while other peers are known.
    assert b.proc.poll() is None and "still retrying, other peers are known" in b.log()
    assert b.kill(signal.SIGTERM) == 0
    assert "stopping" in b.log() and "stopped" in b.log()


def test_port_in_use_exits_with_one_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-c", NODE_MAIN, "node", "--config", str(write_config(tmp_path, "x")), "--listen", f"/ip4/127.0.0.1/tcp/{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("error: cannot listen on")


def test_status_of_a_node_that_serves_no_model_is_a_one_line_error(tmp_path, nodes):
    """`hexswarm status` at a node without a model (it does not speak the status protocol): one line and a
    non-zero exit, not py-libp2p's many-line "Failed to open stream" log (seen in `make demo` while a node was
    still importing its serving layer)."""
    node = NodeProcess(write_config(tmp_path, "R", roles=["relay"]))
    nodes.append(node.start().wait_listening())
    r = subprocess.run([sys.executable, "-m", "hexswarm", "status", "--peer", node.addr], capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "status" in lines[0], r.stderr

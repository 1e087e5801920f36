"""Helpers for node tests: configs, node processes on 127.0.0.1 (or in a netns), table queries.

Also runnable as a script inside a network namespace:
``python tests/netutil.py query MA [MA ...]`` prints {addr: reply} as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hexswarm.launcher import (  # noqa: F401 (re-exported to the node tests)
    NODE_MAIN,
    NodeProcess,
    free_port,
    peer_id_of,
    wait_for,
    write_node_config,
)

REPO = Path(__file__).resolve().parents[1]
# Short timings keep the suite fast; acceptance deadlines derive from them.
FAST = {"heartbeat_s": 0.5, "down_after_s": 2.0, "drop_after_s": 60.0, "probe_s": 2.0, "probe_bytes": 16384}
JOIN_DEADLINE_S = 20.0
STARTUP_TIMEOUT_S = 60.0
# Marked down after down_after_s of silence; the sweep runs every heartbeat.
DOWN_DEADLINE_S = FAST["down_after_s"] + 2 * FAST["heartbeat_s"] + 1.0
CPU_DEVICE = [{"kind": "cpu", "name": "test-cpu", "memory": 4, "tflops": 0.05, "mem_bw": 5}]


def write_config(folder: Path, name: str, **keys: Any) -> Path:
    """A node config in folder/<name>/node.yaml: CPU device, FAST timings, given keys on top."""
    return write_node_config(folder, name, **{"swarm": "test", "devices": CPU_DEVICE, **FAST, **keys})


def query(addrs: Sequence[str], timeout: float = 10.0) -> dict[str, Any]:
    """Each node's /hexswarm/peers/1 reply, asked in parallel from this process."""
    import trio

    from hexswarm.api.peers_client import fetch_peers

    return trio.run(fetch_peers, list(addrs), timeout)


def states(reply: dict[str, Any]) -> dict[str, str]:
    """PeerID -> state from one reply ({} if the node could not be asked)."""
    return {p["peer_id"]: p["state"] for p in reply.get("peers", [])}



def all_see(replies: dict[str, Any], expected: dict[str, str]) -> bool:
    """Every reply lists exactly the expected PeerID -> state pairs for those peers."""
    return all(all(states(r).get(p) == s for p, s in expected.items()) for r in replies.values())


def check_chain(nodes: list[NodeProcess], query_fn: Callable[[list[str]], dict[str, Any]]) -> None:
    """The acceptance scenario on four unstarted nodes A..D, asked through query_fn.

    B bootstraps to A, C to B, D to C; all four see all four up within 20 s;
    SIGKILL of B is seen as down by the others within the heartbeat timeout;
    B restarted with the same key is up again everywhere with the same PeerID.
    """
    a, b, c, d = nodes
    # The join clock starts once the processes listen: interpreter and import
    # time (torch, on a loaded 2-core machine) is not the swarm's doing.
    for node, boot in ((a, None), (b, a), (c, b), (d, c)):
        node.start([boot.addr] if boot else []).wait_listening(STARTUP_TIMEOUT_S)
    everyone_up = {n.peer_id: "up" for n in nodes}
    replies: dict[str, Any] = {}

    def joined() -> bool:
        replies.clear()
        replies.update(query_fn([n.addr for n in nodes]))
        return all_see(replies, everyone_up) and all(len(states(r)) == 4 for r in replies.values())

    assert wait_for(joined, JOIN_DEADLINE_S), f"tables after {JOIN_DEADLINE_S} s: {[states(r) for r in replies.values()]}"

    b_peer_id = b.peer_id
    b.kill(signal.SIGKILL)

    def b_down() -> bool:
        replies.clear()
        replies.update(query_fn([a.addr, c.addr, d.addr]))
        return all_see(replies, {**everyone_up, b_peer_id: "down"})

    assert wait_for(b_down, DOWN_DEADLINE_S, 0.25), f"after SIGKILL of B: {[states(r) for r in replies.values()]}"

    b.start([a.addr]).wait_listening(STARTUP_TIMEOUT_S)  # same config, same key file
    assert wait_for(joined, JOIN_DEADLINE_S), f"after restart of B: {[states(r) for r in replies.values()]}"
    assert states(replies[b.addr]).get(b_peer_id) == "up" and peer_id_of(b.config) == b_peer_id


def stream_request(addr: str, prompt: str, max_new_tokens: int) -> None:
    """Submit one streamed request; print every frame as a JSON line as it comes (for tests that act
    mid-generation from outside the client's network namespace)."""
    import trio

    from hexswarm.api.client import submit_to

    def show(frame: dict) -> None:
        print(json.dumps(frame, default=str), flush=True)

    request = {"prompt": prompt, "max_new_tokens": max_new_tokens, "stream": True}
    show(trio.run(lambda: submit_to(addr, request, show, timeout=300)))


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("query", "submit"):
        sys.exit("usage: netutil.py query MA [MA ...] | submit MA PROMPT MAX_NEW_TOKENS")
    os.environ.setdefault("PYTHONPATH", str(REPO))
    if sys.argv[1] == "submit":
        stream_request(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        print(json.dumps(query(sys.argv[2:]), default=lambda b: b.hex() if isinstance(b, bytes) else str(b)))

"""Issue 13 trust findings, as unit tests: certificate roles, who may lead a layout, which
ready reports count, who may read swarm state, and TP stages that outlive idle time."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import trio

from hexswarm.errors import ProtocolError
from hexswarm.net.admission import Admission, issue_certificate
from hexswarm.net.identity import generate
from hexswarm.net.protocols import RemoteError
from hexswarm.runtime import stage_host
from hexswarm.runtime.stage_host import StageHost, StageSpec
from hexswarm.serve.layout import StageAssignment, SwarmLayout
from hexswarm.serve.layout import rendezvous_rank
from hexswarm.swarm.peer_table import PeerState, PeerTable
from hexswarm.swarm.records import NodeRecord
from hexswarm.serve.serving import HeadSettings, Server


def _owner_and_admission():
    owner = generate()
    return owner, Admission(owner.peer_id.to_base58(), "s", "me")


def test_a_client_certificate_grants_the_client_role_only():
    owner, adm = _owner_and_admission()
    client, node = "client-peer", "node-peer"
    assert adm.admit(client, issue_certificate(owner, "s", client, "client"), roles=("client", "node")) == "client"
    assert adm.is_admitted(client, "client") and not adm.is_admitted(client, "node") and not adm.is_admitted(client)
    # certificates made before roles were recorded (role "node", the `hexswarm admit` default) stay valid
    adm.admit(node, issue_certificate(owner, "s", node))
    assert adm.is_admitted(node) and adm.is_admitted(node, "client")
    # a node that later submits with a client certificate keeps its node role
    adm.admit(node, issue_certificate(owner, "s", node, "client"), roles=("client", "node"))
    assert adm.is_admitted(node, "node")
    assert adm.is_admitted("me", "node")


def _node(adm: Admission):
    """Just what Node.is_allowed / admit_client / _clients_only use."""
    from hexswarm.swarm.node import Node

    node = object.__new__(Node)
    node._allowed, node.admission = None, adm
    return node


def test_node_protocols_refuse_clients_and_readers_need_a_certificate():
    owner, adm = _owner_and_admission()
    node = _node(adm)
    node.admit_client("client-peer", {"cert": issue_certificate(owner, "s", "client-peer", "client")})
    assert not node.is_allowed("client-peer")  # ping, layout, dispatch, pipe, direct, gossip

    async def status(msg, remote):
        return "status"

    guarded = node._clients_only(status)
    assert trio.run(guarded, {}, "client-peer") == "status"
    with pytest.raises(RemoteError) as refused:
        trio.run(guarded, {}, "stranger")
    assert refused.value.code == "forbidden" and "\n" not in str(refused.value)
    rogue = generate()
    with pytest.raises(RemoteError):
        trio.run(guarded, {"cert": issue_certificate(rogue, "s", "stranger", "client")}, "stranger")
    # a reader may bring its certificate in the request itself
    assert trio.run(guarded, {"cert": issue_certificate(owner, "s", "reader", "client")}, "reader") == "status"
    # without swarm_owner everything stays open to everyone, as before
    assert trio.run(_node(None)._clients_only(status), {}, "anyone") == "status"


def _record(peer: str, roles: list[str], model: str = "m1", seq: int = 1) -> NodeRecord:
    return NodeRecord(peer, b"k" * 32, "s", [], [], roles, {}, 1, seq, 0.0, extra={"model": model, "serve": True})


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _server(me: str, records: list[NodeRecord], admitted: set[str], clock=None) -> Server:
    table = PeerTable(5.0, 10.0, clock=clock or _Clock())
    for r in records:
        table.observe(r)
    node = SimpleNamespace(table=table, config=SimpleNamespace(roles=["head", "worker"]),
                           is_allowed=lambda p: p in admitted)
    server = object.__new__(Server)
    server.node, server.me, server.model_id, server._ready = node, me, "m1", {}
    server.head_settings = HeadSettings(term_s=300.0)
    return server


def _current_term() -> int:
    return Server.term.fget(SimpleNamespace(head_settings=HeadSettings(term_s=300.0)))


def _layout(head: str, peers: list[str], epoch: int = 3, term: int | None = None) -> SwarmLayout:
    stages = tuple(StageAssignment(p, 1, i, i + 1) for i, p in enumerate(peers))
    return SwarmLayout(epoch, head, "m1", tuple(peers), (stages,), term=_current_term() if term is None else term)


def test_only_a_live_admitted_head_candidate_may_lead_a_layout():
    clock = _Clock()
    server = _server("me", [_record("h2", ["head"]), _record("w", ["worker"]), _record("other", ["head"], "m2")],
                     admitted={"me", "h2", "w", "other"}, clock=clock)
    clock.t += 60  # everyone up for a minute
    term = server.term
    first = rendezvous_rank(["me", "h2"], term)[0]
    server.check_layout_head(_layout(first, [first, "w"]))  # this term's head
    for head in ("w", "other", "stranger"):  # a worker, a node of another model, nobody we know
        with pytest.raises(ProtocolError):
            server.check_layout_head(_layout(head, [head]))
    with pytest.raises(ProtocolError, match="not admitted"):
        _server("me", [_record("h2", ["head"])], admitted={"me"}).check_layout_head(_layout("h2", ["h2"]))


def _two_heads(clock: _Clock):
    """A server "me" (a worker) that sees head candidates h1 and h2, both up a minute and just heard from; the
    term now, and the two in that term's order (lead, other)."""
    server = _server("me", [_record("h1", ["head"]), _record("h2", ["head"])], admitted={"me", "h1", "h2"},
                     clock=clock)
    server.node.config.roles = ["worker"]
    clock.t += 60
    for peer in ("h1", "h2"):
        server.node.table.observe(_record(peer, ["head"], seq=2))
    term = server.term
    lead, other = rendezvous_rank(["h1", "h2"], term)
    return server, term, lead, other


def test_a_layout_is_taken_only_from_the_head_of_its_term():
    clock = _Clock()
    server, term, lead, other = _two_heads(clock)
    server.check_layout_head(_layout(lead, [lead, "me"], term=term))
    with pytest.raises(ProtocolError, match="not the head of term"):  # lead is up and heard: other does not lead
        server.check_layout_head(_layout(other, [other, "me"], term=term))
    for stale in (term - 3, term + 2, 0):  # a term long past, or ahead of any clock skew
        with pytest.raises(ProtocolError):
            server.check_layout_head(_layout(lead, [lead, "me"], term=stale))


def test_a_head_that_skipped_a_silent_or_new_peer_is_taken():
    clock = _Clock()
    server, term, lead, other = _two_heads(clock)
    table = server.node.table
    by_other = _layout(other, [other, "me"], term=term)
    clock.t += 3.0  # lead silent 3 s (> half of down_after_s): the new head may have seen it down already
    table.observe(_record(other, ["head"], seq=3))
    server.check_layout_head(by_other)
    # lead back up just now (a head whose view did not have it yet skipped it rightly) ...
    clock.t += 4.0  # lead silent 7 s: down here too
    table.sweep()
    assert table.get(lead).state == PeerState.DOWN
    table.observe(_record(lead, ["head"], seq=3))
    table.observe(_record(other, ["head"], seq=4))
    server.check_layout_head(by_other)
    clock.t += 11.0  # ... but not once it has been up a while
    table.observe(_record(lead, ["head"], seq=4))
    table.observe(_record(other, ["head"], seq=5))
    with pytest.raises(ProtocolError, match="not the head of term"):
        server.check_layout_head(by_other)


def test_an_old_commit_is_taken_when_this_terms_head_republishes_it():
    clock = _Clock()
    server, term, lead, other = _two_heads(clock)
    for maker in ("h1", "h2"):
        old = _layout(maker, [maker, "me"], term=term - 10)  # made long ago, served since
        server.check_layout_head(old, "commit", lead)  # each head re-gossips the commit it serves
        with pytest.raises(ProtocolError):  # nobody else vouches for it
            server.check_layout_head(old, "commit", other)
        with pytest.raises(ProtocolError):  # and only for a commit
            server.check_layout_head(old, "propose", lead)


def test_ready_counts_only_for_the_pending_proposal_and_its_peers():
    server = _server("me", [], admitted={"me"})
    layout = _layout("me", ["me", "w"], epoch=7)
    with pytest.raises(ProtocolError):
        server.mark_ready(7, "w")  # nothing proposed yet
    server._ready[7] = (layout, set())
    server.mark_ready(7, "w")
    for epoch, peer in ((8, "w"), (10**12, "w"), (7, "stranger")):
        with pytest.raises(ProtocolError):
            server.mark_ready(epoch, peer)
    assert list(server._ready) == [7] and server._ready[7][1] == {"w"}


def test_tp_groups_outlive_idle_time_and_a_dead_follower_fails_the_stage():
    assert stage_host.OP_TIMEOUT.total_seconds() >= 30 * 86400  # the old 600 s killed idle TP-2 stages
    host = StageHost(StageSpec("m", 0, 1, 2, True, True), "t")
    host.executor = SimpleNamespace(lead=lambda op: "out")
    host.followers = [subprocess.Popen([sys.executable, "-c", "pass"])]
    host.followers[0].wait()
    assert not host.followers_alive()
    with pytest.raises(RuntimeError, match="follower exited"):
        host.run({"op": "forward"})
    host.followers = []
    assert host.run({"op": "forward"}) == "out"

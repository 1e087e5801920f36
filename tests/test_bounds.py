"""Bounded per-peer state (issue 13): open-stream counts, direct-path tickets, remembered attempts and submitters."""

from __future__ import annotations

import trio

from hexswarm.net.direct import MAX_PER_PEER, DirectReceiver
from hexswarm.net.ratelimit import PeerSlots
from entry_port_fake import port_of


def test_peer_slots_hold_a_peer_to_its_limit_and_forget_idle_peers():
    slots = PeerSlots(2)
    assert slots.acquire("a") and slots.acquire("a") and not slots.acquire("a")
    assert slots.acquire("b")  # another peer is not affected
    slots.release("a")
    assert slots.acquire("a")
    for _ in range(2):
        slots.release("a")
    slots.release("b")
    assert slots.held("a") == slots.held("b") == 0 and not slots._open


def test_a_peer_holds_a_few_direct_tickets_at_most():
    receiver = DirectReceiver(node=None, deliver=lambda m, p: None, max_frame=1024, body_timeout=1.0)
    receiver.port = 1
    for _ in range(50):
        trio.run(receiver._offer, {}, "greedy")
    trio.run(receiver._offer, {}, "other")
    peers = [p for p, _, _ in receiver._tickets.values()]
    assert peers.count("greedy") == MAX_PER_PEER and peers.count("other") == 1


def test_remembered_start_attempts_and_submitters_are_bounded(monkeypatch):
    from collections import OrderedDict
    from types import SimpleNamespace

    from hexswarm.serve import serving

    from hexswarm.serve import submit
    from hexswarm.serve.serving import Server
    from hexswarm.serve.submit import SubmitService

    monkeypatch.setattr(serving, "START_HISTORY", 8)
    server = object.__new__(Server)
    server.me, server._start_attempts = "head", OrderedDict()
    for i in range(20):
        server._check_start("e", f"r{i}", 1, "head")
    assert len(server._start_attempts) == 8

    monkeypatch.setattr(submit, "HISTORY", 8)
    service = SubmitService(port_of(SimpleNamespace(node=SimpleNamespace(config=SimpleNamespace(max_queue=4)))))
    for i in range(20):
        service._note_submitter(f"r{i}", "client")
    assert len(service.submitters) == 8 and "r19" in service.submitters
    assert service.open_streams.limit == 4  # submit streams one peer may hold open: the entry's max_queue

"""RelayStack on one host, no namespaces: failures are answers, never exceptions that end the node."""

from __future__ import annotations

import multiaddr
import pytest
import trio
import trio.testing

from hexswarm.net import identity
from hexswarm.net.host import make_host
from hexswarm.net.relay import RelayStack

LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


def test_reserving_on_a_relay_that_is_gone_returns_false():
    async def main():
        host = make_host(identity.generate())
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]), trio.open_nursery() as nursery:
            stack = RelayStack(host, hop=False, hole_punch=False)
            await nursery.start(stack.run)
            # a relay seen up a moment ago, now gone: py-libp2p's new_stream raises StreamFailure
            assert await stack.reserve(identity.generate().peer_id) is False
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_relayed_circuit_ending_leaves_the_other_circuits_of_its_peer_alone():
    """B and C both reach A through relay R; B's connection ends: C's must carry on (py-libp2p's relay
    keys its circuit table by PeerID, so stock the end of B->A closed C->A's streams: docs/net.md)."""
    from libp2p.peer.peerinfo import PeerInfo

    async def main():
        hosts = [make_host(identity.generate()) for _ in range(4)]
        r, a, b, c = hosts
        async with (r.run(LISTEN), a.run(LISTEN), b.run(LISTEN), c.run(LISTEN),
                    trio.open_nursery() as nursery):
            stacks = [RelayStack(h, hop=h is r, hole_punch=False) for h in hosts]
            for stack in stacks:
                await nursery.start(stack.run)
            for h in (a, b, c):
                await h.connect(PeerInfo(r.get_id(), r.get_addrs()))
            assert await stacks[1].reserve(r.get_id())
            received = []

            async def echo(stream):
                while data := await stream.read(64):
                    received.append(data)
                    await stream.write(data)

            a.set_stream_handler("/echo/1", echo)
            circuit = f"{r.get_addrs()[0]}/p2p-circuit/p2p/{a.get_id()}"
            await stacks[2].dial(circuit)
            await stacks[3].dial(circuit)
            from_c = await c.new_stream(a.get_id(), ["/echo/1"])
            await b.get_network().close_peer(a.get_id())  # B's circuit ends
            await trio.sleep(0.5)
            with trio.fail_after(5):
                await from_c.write(b"still here")
                assert await from_c.read(64) == b"still here"
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_pipe_link_that_cannot_be_opened_is_reported_not_raised():
    """A peer reached only through a relay that just died: opening the link fails.  The writer reports the
    undelivered messages and the broken link; nothing escapes into the node (a KeyError here once ended it)."""
    from hexswarm.serve.pipe import MessagePipe

    failed, broken = [], []
    pipe = MessagePipe(node=None, on_send_failed=lambda peer, msgs: failed.append(msgs),
                       on_link_broken=broken.append)

    async def unreachable(peer):
        raise ConnectionError("no relay left")

    pipe._open_stream = unreachable

    async def main():
        channel, receive = trio.open_memory_channel(8)
        pipe._out["B"] = channel
        channel.send_nowait({"kind": "start"})
        await pipe._writer("B", channel, receive)

    trio.run(main)
    assert failed == [[{"kind": "start"}]] and broken == ["B"] and "B" not in pipe._out


def test_an_unchanged_reachability_is_asked_for_less_and_less_often():
    from hexswarm.swarm.nat import REACHABILITY_EVERY_S, REACHABILITY_MAX_EVERY_S, next_reachability_check

    every, schedule = REACHABILITY_EVERY_S, []
    for _ in range(8):
        every = next_reachability_check(every, changed=False)
        schedule.append(every)
    assert schedule[:3] == [2 * REACHABILITY_EVERY_S, 4 * REACHABILITY_EVERY_S, 8 * REACHABILITY_EVERY_S]
    assert schedule[-1] == REACHABILITY_MAX_EVERY_S
    assert next_reachability_check(REACHABILITY_MAX_EVERY_S, changed=True) == REACHABILITY_EVERY_S  # a change: soon again


class _Conn:
    """A py-libp2p connection as the direct-path decision sees it: transport addresses and a remote (ip, port)."""

    def __init__(self, ip: str, relayed: bool = False):
        from types import SimpleNamespace

        self.ip, self.relayed = ip, relayed
        self.muxed_conn = SimpleNamespace(secured_conn=SimpleNamespace(get_remote_address=lambda: (ip, 40123)))

    def get_transport_addresses(self):
        return ["/ip4/198.51.100.1/tcp/4001/p2p/QmRelay/p2p-circuit" if self.relayed else f"/ip4/{self.ip}/tcp/40123"]


def _host(peer_id, conns):
    from types import SimpleNamespace

    network = SimpleNamespace(connections={peer_id: conns})
    return SimpleNamespace(get_network=lambda: network)


B_ADDRS = ["/ip4/192.168.1.5/tcp/4001/p2p/QmB", "/ip4/127.0.0.1/tcp/4001/p2p/QmB",
           "/ip4/198.51.100.1/tcp/4001/p2p/QmRelay/p2p-circuit/p2p/QmB"]


@pytest.mark.parametrize("conns, addrs, expected, listed", [
    ([_Conn("192.168.1.5")], B_ADDRS, "192.168.1.5", True),  # a LAN: an address B lists
    ([_Conn("127.0.0.1")], B_ADDRS, "127.0.0.1", True),  # loopback (the test swarms)
    ([_Conn("::ffff:192.168.1.5")], B_ADDRS, "::ffff:192.168.1.5", True),  # IPv4-mapped
    ([_Conn("203.0.113.7")], B_ADDRS, "203.0.113.7", False),  # punched, or a 1:1 NAT: B's NAT's public side
    ([_Conn("198.51.100.1", relayed=True)], B_ADDRS, None, False),  # relayed: the relay's IP is no data path
    ([], B_ADDRS, None, False),  # no connection
    ([_Conn("192.168.1.5")], None, "192.168.1.5", False),  # no record of B's addresses
    ([_Conn("203.0.113.7"), _Conn("192.168.1.5")], B_ADDRS, "192.168.1.5", True),  # the listed one of two
])
def test_the_direct_data_path_is_sure_only_at_an_ip_the_peer_lists(conns, addrs, expected, listed):
    from hexswarm.net.relay import direct_data_ip

    ip, why = direct_data_ip(_host("B", conns), "B", addrs)
    assert ip == expected
    assert (why == "") == listed


def _pipe_to(remote: str, addrs: list[str]):
    """A MessagePipe with the direct path on, whose node reaches peer B over one connection at `remote`."""
    from types import SimpleNamespace

    from hexswarm.net.host import parse_peer_id
    from hexswarm.serve.pipe import MessagePipe

    b = str(identity.generate().peer_id)
    record = SimpleNamespace(addrs=addrs)
    node = SimpleNamespace(host=_host(parse_peer_id(b), [_Conn(remote)]),
                           table=SimpleNamespace(get=lambda p: SimpleNamespace(record=record) if p == b else None))
    return MessagePipe(node, direct=True), b


def test_a_punched_connection_tries_the_direct_path_only_briefly(monkeypatch, caplog):
    """Over a punched connection the peer's IP is its NAT's: no punch opened the data port there, and open_direct
    would hang until its 5-s timeout; a 1:1 NAT (a cloud VM's public IP) would connect at once.  So such an IP is
    tried for UNLISTED_DIRECT_TIMEOUT_S only; an IP the peer lists gets open_direct's own timeout."""
    import logging

    import hexswarm.net.direct as direct
    from hexswarm.serve.pipe import UNLISTED_DIRECT_TIMEOUT_S

    tried = []

    async def open_direct(node, peer, ip, timeout=5.0):
        tried.append((ip, timeout))
        return "sender"

    monkeypatch.setattr(direct, "open_direct", open_direct)
    pipe, b = _pipe_to("203.0.113.7", B_ADDRS)
    with caplog.at_level(logging.INFO, logger="hexswarm.pipe"):
        assert trio.run(pipe._open_direct, b) == "sender"
    assert tried == [("203.0.113.7", UNLISTED_DIRECT_TIMEOUT_S)] and UNLISTED_DIRECT_TIMEOUT_S < 5.0
    assert "does not list" in caplog.text

    pipe, b = _pipe_to("192.168.1.5", B_ADDRS)  # the same peer on a LAN: the direct path as before
    assert trio.run(pipe._open_direct, b) == "sender" and tried[-1] == ("192.168.1.5", 5.0)
    pipe, b = _pipe_to("198.51.100.1", [])  # a peer listing nothing at all: tried briefly too
    assert trio.run(pipe._open_direct, b) == "sender" and tried[-1] == ("198.51.100.1", UNLISTED_DIRECT_TIMEOUT_S)


def test_a_failed_direct_attempt_is_not_repeated_for_a_while(monkeypatch):
    import hexswarm.net.direct as direct
    from hexswarm.serve.pipe import DIRECT_RETRY_S

    tried = []

    async def open_direct(node, peer, ip, timeout=5.0):
        tried.append(ip)
        if len(tried) == 1:
            raise trio.TooSlowError
        return "sender"

    monkeypatch.setattr(direct, "open_direct", open_direct)
    pipe, b = _pipe_to("192.168.1.5", B_ADDRS)
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main():
        assert await pipe._open_direct(b) is None  # failed: remembered
        assert await pipe._open_direct(b) is None and len(tried) == 1  # the next link does not wait again
        await trio.sleep(DIRECT_RETRY_S + 1)
        assert await pipe._open_direct(b) == "sender" and len(tried) == 2  # tried again later
        assert b not in pipe._direct_failed

    trio.run(main, clock=clock)

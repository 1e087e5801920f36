"""RelayStack on one host, no namespaces: failures are answers, never exceptions that end the node."""

from __future__ import annotations

import multiaddr
import trio

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
    from hexswarm.swarm.pipe import MessagePipe

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

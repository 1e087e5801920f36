"""RelayStack on one host, no namespaces: failures are answers, never exceptions that end the node."""

from __future__ import annotations

import multiaddr
import trio

from hexswarm.net import identity
from hexswarm.net.host import make_host
from hexswarm.net.relay import RelayStack


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

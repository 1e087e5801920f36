"""Ask a running node for its peer table over /hexswarm/peers/1, from a throwaway host."""

from __future__ import annotations

from typing import Any

import trio

from hexswarm.errors import UserError
from hexswarm.net import identity
from hexswarm.net.host import dial, make_host, parse_peer_multiaddr
from hexswarm.net.protocols import PEERS, RequestError, request


async def fetch_peers(addrs: list[str], timeout: float = 10.0, client_identity=None, cert=None) -> dict[str, Any]:
    """addr -> the node's reply ({self, swarm, peers}) or {"error": str}, asking all at once; a swarm
    with an owner answers only holders of a certificate (`cert`, issued for `client_identity`)."""
    import multiaddr

    infos = {a: parse_peer_multiaddr(a, "--peer") for a in addrs}
    host = make_host(client_identity or identity.generate())
    results: dict[str, Any] = {}

    async def ask(addr: str) -> None:
        try:
            await dial(host, infos[addr], timeout=timeout)
            results[addr] = await request(host, infos[addr].peer_id, PEERS, {} if cert is None else {"cert": cert},
                                          timeout=timeout)
        except (ConnectionError, RequestError) as e:
            results[addr] = {"error": str(e)}

    # Listening on an ephemeral loopback port: py-libp2p's swarm wants a listener to run.
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        async with trio.open_nursery() as nursery:
            for addr in addrs:
                nursery.start_soon(ask, addr)
    return results


def peers_of(addr: str, timeout: float = 10.0, client_identity=None, cert=None) -> dict[str, Any]:
    """Blocking: one node's reply; UserError when it cannot be asked."""
    reply = trio.run(fetch_peers, [addr], timeout, client_identity, cert)[addr]
    if "error" in reply and "peers" not in reply:
        raise UserError(f"cannot get peers from {addr}: {reply['error']}")
    return reply

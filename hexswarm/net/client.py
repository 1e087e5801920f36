"""A short-lived client host: dial one node, do something over it, leave.

Used by the CLI commands that talk to a running node (peers, status, submit).
Errors come out as one UserError, not as nested trio exception groups.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from hexswarm.errors import UserError, first_leaf
from hexswarm.net import identity as identities
from hexswarm.net.host import dial, make_host, parse_peer_multiaddr
from hexswarm.net.protocols import RequestError, request

T = TypeVar("T")


async def with_node(addr: str, fn: Callable[[Any, Any], Awaitable[T]], timeout: float = 10.0,
                    client_identity=None) -> T:
    """Run ``await fn(host, peer_id)`` connected to the node at `addr`."""
    import multiaddr

    info = parse_peer_multiaddr(addr, "--peer")
    host = make_host(client_identity or identities.generate())
    try:
        # py-libp2p's swarm wants a listener to run: an ephemeral loopback port
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                await dial(host, info, timeout=timeout)
            except ConnectionError as e:
                raise UserError(f"cannot reach {addr}: {e}") from None
            return await fn(host, info.peer_id)
    except Exception as e:
        leaf = first_leaf(e)
        if isinstance(leaf, UserError):
            raise leaf from None
        raise UserError(f"talking to {addr} failed: {type(leaf).__name__}: {leaf}") from None


async def ask(addr: str, protocol: str, msg: Any, timeout: float = 10.0, client_identity=None) -> Any:
    """One request/response exchange with the node at `addr` (as `client_identity` if given)."""
    async def exchange(host, peer_id):
        try:
            return await request(host, peer_id, protocol, msg, timeout=timeout)
        except RequestError as e:
            raise UserError(f"{addr}: {e}") from None

    return await with_node(addr, exchange, timeout, client_identity)

"""Ask a running node for its serving status (`/hexswarm/status/1`) from a throwaway host."""

from __future__ import annotations

import multiaddr

from hexswarm.errors import UserError
from hexswarm.net import identity
from hexswarm.net.host import dial, make_host, parse_peer_multiaddr
from hexswarm.net.protocols import RequestError, request

STATUS = "/hexswarm/status/1"


async def fetch_status(addr: str, timeout: float = 10.0) -> dict:
    info = parse_peer_multiaddr(addr, "--peer")
    host = make_host(identity.generate())
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        try:
            await dial(host, info, timeout=timeout)
            return await request(host, info.peer_id, STATUS, {}, timeout=timeout)
        except (ConnectionError, RequestError) as e:
            raise UserError(f"cannot get status from {addr}: {e}") from None

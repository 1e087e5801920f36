"""Ask a running node for its serving status (`/hexswarm/status/1`)."""

from __future__ import annotations

from hexswarm.net.client import ask
from hexswarm.net.protocols import STATUS


async def fetch_status(addr: str, timeout: float = 10.0, client_identity=None, cert=None) -> dict:
    """The node's status; a swarm with an owner answers only its nodes and holders of a client
    certificate (`cert`, issued for `client_identity`)."""
    return await ask(addr, STATUS, {} if cert is None else {"cert": cert}, timeout, client_identity)

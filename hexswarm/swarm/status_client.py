"""Ask a running node for its serving status (`/hexswarm/status/1`)."""

from __future__ import annotations

from hexswarm.net.client import ask
from hexswarm.net.protocols import STATUS


async def fetch_status(addr: str, timeout: float = 10.0) -> dict:
    return await ask(addr, STATUS, {}, timeout)

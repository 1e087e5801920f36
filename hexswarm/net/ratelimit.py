"""Per-peer bounds: token buckets (a peer may burst, then is held to a steady rate) and counts of
what a peer holds open at once (streams, connections, tickets)."""

from __future__ import annotations

import time


class PeerRateLimiter:
    def __init__(self, rate_per_s: float, burst: float, clock=time.monotonic, max_peers: int = 10000):
        self.rate = rate_per_s
        self.burst = burst
        self.clock = clock
        self.max_peers = max_peers
        self._buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, last refill)

    def allow(self, peer: str) -> bool:
        now = self.clock()
        tokens, last = self._buckets.get(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self._buckets) >= self.max_peers and peer not in self._buckets:
            self._buckets.clear()  # bounded memory under a flood of identities
        if tokens < 1.0:
            self._buckets[peer] = (tokens, now)
            return False
        self._buckets[peer] = (tokens - 1.0, now)
        return True

    def retry_after_s(self, peer: str) -> float:
        tokens, _ = self._buckets.get(peer, (self.burst, 0.0))
        return max(0.0, (1.0 - tokens) / self.rate)


class PeerSlots:
    """At most `limit` things open per peer at once; the table holds only peers with something open."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, peer: str) -> bool:
        n = self._open.get(peer, 0)
        if n >= self.limit:
            return False
        self._open[peer] = n + 1
        return True

    def release(self, peer: str) -> None:
        n = self._open.get(peer, 0) - 1
        if n > 0:
            self._open[peer] = n
        else:
            self._open.pop(peer, None)

    def held(self, peer: str) -> int:
        return self._open.get(peer, 0)

"""Per-peer token buckets: a peer may burst, then is held to a steady rate."""

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

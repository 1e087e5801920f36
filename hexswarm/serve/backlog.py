"""Bounded acceptance: an entry takes a new request only when the swarm can serve it before its deadline.

Two numbers travel in every serving node's record (`extra`):
- `rate`: the tokens per second the stage 0s of this node emitted while they held requests, over the last
  RATE_WINDOW_S (absent until they were busy for MIN_BUSY_S of it): what its pipelines serve, measured;
- `owed`: the tokens this node, as an entry, still owes its clients (each request's `max_new_tokens` less
  what it delivered, placed or still waiting to be placed);
- `emitted`: the running count of tokens its stage 0s emitted (an entry whose request waits in that stage 0's
  queue sees the count grow, and does not take the wait for a stalled pipeline: serve/submit.py).

An entry adds up `owed` over the live serving peers (itself included, counted now) and `rate` over the stage
0s of the committed layout's healthy replicas, and accepts a new request only when that backlog plus the
request would be served within ADMIT_FRACTION of the request's deadline: the rest of the deadline is for
the faults (a lost pipeline costs a re-prefill and the wait for a new one).  Otherwise the client gets a
one-line `busy` refusal with a retry hint, before anything is accepted.  A request already accepted (a
resume, or a client's failover from another entry) is never refused for load.  Until no rate is known (a
swarm that served nothing yet) this bound does not apply; the head's per-replica queue cap still does.
Numbers from peers are clamped: a lying peer can make entries refuse early, never accept more.
"""

from __future__ import annotations

import math
import time
from collections import deque

RATE_WINDOW_S = 30.0  # the rate is measured over this much of the recent past
MIN_BUSY_S = 3.0  # ... once stage 0 was busy this long in it
ADMIT_FRACTION = 0.25  # the backlog a new request joins must clear within this share of its deadline
MAX_RATE = 1e7  # tokens/s a peer may claim
MAX_OWED = 1 << 30  # tokens a peer may claim to owe


class ServiceRate:
    """Tokens emitted per busy second over a sliding window, from periodic samples of a running total."""

    def __init__(self, window_s: float = RATE_WINDOW_S, min_busy_s: float = MIN_BUSY_S):
        self.window_s, self.min_busy_s = window_s, min_busy_s
        self._samples: deque[tuple[float, int, float]] = deque()  # (time, tokens since last, busy seconds since last)
        self._last: tuple[float, int] | None = None

    def sample(self, tokens_total: int, busy: bool, now: float | None = None) -> None:
        """Record the running token total now; `busy`: stage 0 held requests since the last sample."""
        now = time.monotonic() if now is None else now
        if self._last is not None:
            t0, n0 = self._last
            dt = max(0.0, now - t0)
            tokens = max(0, tokens_total - n0)
            if busy or tokens:
                self._samples.append((now, tokens, dt))
        self._last = (now, tokens_total)
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def rate(self) -> float | None:
        busy = sum(s[2] for s in self._samples)
        if busy < self.min_busy_s:
            return None
        return sum(s[1] for s in self._samples) / busy


def _number(v, hi: float) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        return None
    return min(float(v), hi)


def publish(server) -> None:
    """Put this node's `rate` (as a stage 0) and `owed` (as an entry) in its next record."""
    stages = server.stages
    busy = any(w.in_flight for (e, r, s), w in list(stages.workers.items()) if s == 0)
    server.service_rate.sample(stages.tokens_out, busy)
    rate = server.service_rate.rate()
    if rate is None:
        server.node.extra.pop("rate", None)
    else:
        server.node.extra["rate"] = round(rate, 3)
    server.node.extra["owed"] = server.submit_service.owed()
    server.node.extra["emitted"] = stages.tokens_out  # grows while stage 0 serves: a queued request is not stalled


def swarm_rate(server) -> float | None:
    """Tokens/s the committed layout's healthy replicas serve, from their stage 0s' measured rates (a stage 0
    not measured yet counts as the mean of those that are); None when none is measured or none is healthy."""
    layout = server.committed
    if layout is None:
        return None
    peers = {layout.replicas[r][0].peer for r in server.healthy_replicas(layout)}
    rates: dict[str, float | None] = {}
    for peer in peers:
        if peer == server.me:
            rates[peer] = server.service_rate.rate()
        else:
            entry = server.node.table.get(peer)
            rates[peer] = _number(entry.record.extra.get("rate"), MAX_RATE) if entry else None
    known = [r for r in rates.values() if r is not None]
    if not known:
        return None
    mean = sum(known) / len(known)
    return sum(r if r is not None else mean for r in rates.values())


def swarm_owed(server) -> int:
    """Tokens every live entry of the swarm still owes (this node's counted now, the others' as gossiped)."""
    total = server.submit_service.owed()
    for peer in server.serving_view():
        if peer == server.me:
            continue
        entry = server.node.table.get(peer)
        owed = _number(entry.record.extra.get("owed"), MAX_OWED) if entry else None
        total += int(owed or 0)
    return total


def refusal(server, new_tokens: int, deadline_s: float) -> str | None:
    """The one-line busy message for a new request of `new_tokens` that the swarm cannot serve within
    ADMIT_FRACTION of `deadline_s`, or None: take it."""
    rate = swarm_rate(server)
    if not rate:
        return None
    owed = swarm_owed(server)
    wait = (owed + new_tokens) / rate
    allowed = ADMIT_FRACTION * deadline_s
    if wait <= allowed:
        return None
    return (f"busy: the swarm owes {owed} tokens at ~{rate:.0f} tokens/s (~{wait:.0f} s of work, more than "
            f"{allowed:.0f} s of this request's {deadline_s:.0f} s); retry after {max(1.0, wait - allowed):.0f} s")

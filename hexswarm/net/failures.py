"""Unexpected exceptions at a protocol boundary: one log line and a count, never a dead node.

Every message a peer sends is decoded into a checked value first (a bad one is a ProtocolError,
answered or dropped).  Anything else raised while handling it is a bug: the stream or connection it
came on is closed, `unexpected` logs one line (no traceback: a peer must not be able to fill the
log), and `COUNTS` (the `hexswarm_unexpected_errors` gauge on /metrics) counts it per protocol.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("hexswarm.failures")

COUNTS: Counter[str] = Counter()


def unexpected(where: str, peer: object, error: BaseException) -> None:
    """Record an exception a handler did not expect: one line, one count."""
    COUNTS[where] += 1
    log.error("unexpected %s in %s from %s: %s", type(error).__name__, where, peer, str(error)[:300])

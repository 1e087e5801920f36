"""Per-request timing at one stage: how long its steps waited, computed, and spent on the wire
getting here.  Bounded: the oldest requests are forgotten first."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class SpanLog:
    def __init__(self, limit: int = 4096):
        self.limit = limit
        self._spans: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()  # written by the stage thread, read by the trio thread

    def add(self, rid: str, *, queue_s: float = 0.0, compute_s: float = 0.0, net_s: float = 0.0) -> None:
        with self._lock:
            span = self._spans.get(rid)
            if span is None:
                span = self._spans[rid] = {"steps": 0, "queue_s": 0.0, "compute_s": 0.0, "net_in_s": 0.0}
                if len(self._spans) > self.limit:
                    self._spans.popitem(last=False)
            span["steps"] += 1
            span["queue_s"] += max(0.0, queue_s)
            span["compute_s"] += compute_s
            span["net_in_s"] += max(0.0, net_s)

    def get(self, rid: str) -> dict | None:
        with self._lock:
            span = self._spans.get(rid)
            return None if span is None else {k: round(v, 6) if isinstance(v, float) else v for k, v in span.items()}


def wire_delay(msg: dict) -> float:
    """Seconds between a message's send (sender's wall clock) and its arrival here."""
    sent, got = msg.get("sent_at"), msg.get("_recv_at")
    return (got - sent) if isinstance(sent, (int, float)) and isinstance(got, (int, float)) else 0.0


def waited(msg: dict) -> float:
    got = msg.get("_recv_at")
    return time.time() - got if isinstance(got, (int, float)) else 0.0

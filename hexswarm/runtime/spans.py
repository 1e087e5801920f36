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
        self._updated: set[str] = set()  # touched since take_updates (an engine process reports them)
        self._lock = threading.Lock()  # written by the stage thread, read by the trio thread

    def add(self, rid: str, *, queue_s: float = 0.0, compute_s: float = 0.0, net_s: float = 0.0) -> None:
        with self._lock:
            span = self._spans.get(rid)
            if span is None:
                span = self._spans[rid] = {"steps": 0, "queue_s": 0.0, "compute_s": 0.0, "net_in_s": 0.0}
                if len(self._spans) > self.limit:
                    self._spans.popitem(last=False)
            self._updated.add(rid)
            span["steps"] += 1
            span["queue_s"] += max(0.0, queue_s)
            span["compute_s"] += compute_s
            span["net_in_s"] += max(0.0, net_s)

    def take_updates(self) -> dict[str, dict]:
        """The spans touched since the last call."""
        with self._lock:
            out = {rid: dict(self._spans[rid]) for rid in self._updated if rid in self._spans}
            self._updated.clear()
            return out

    def put(self, rid: str, span: dict) -> None:
        """Set a span as another process measured it."""
        with self._lock:
            self._spans[rid] = dict(span)
            self._spans.move_to_end(rid)
            if len(self._spans) > self.limit:
                self._spans.popitem(last=False)

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

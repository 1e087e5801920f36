"""Field checks for what peers send, and the control requests (layout, trace) read with them.

Every check raises ProtocolError naming the field: types, finiteness, integer ranges, lengths.  The pipe's
message kinds are decoded with these checks in serve/pipeline_messages.py; the request/response protocols'
messages are read here (`read_*`), or there where a protocol carries a pipe kind (`/hexswarm/dispatch/1`).
"""

from __future__ import annotations

from typing import Any

from hexswarm.errors import ProtocolError, UserError
from hexswarm.runtime.sampling import SamplingParams
from hexswarm.runtime.stopping import MAX_STOP_STRINGS

MAX_RID = 160  # a client's id (at most 128 characters) scoped by its entry (serve/submit.py: wire_id)
MAX_INT = 2**63 - 1  # epochs, attempts, indices: anything a peer may send that still fits an int64


def need(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(what)


def or_default(v: Any, default: Any) -> Any:
    """`v`, or `default` where the field is absent (None).  Not `v or default`: a truth test of a sender's value
    runs its __bool__ (a tensor of several values raises RuntimeError; found by the chaos run's hostile sender)."""
    return default if v is None else v


def is_int(v: Any, lo: int = 0, hi: int = MAX_INT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def request_id(v: Any) -> str:
    need(isinstance(v, str) and 0 < len(v) <= MAX_RID, f"request id: a string of 1 to {MAX_RID} characters")
    return v


def int_list(v: Any, name: str, n: int | None = None, lo: int = 0, hi: int | None = None) -> list[int]:
    # C-speed checks (set of types, min, max): a done message carries every token of its request
    need(type(v) is list and (not v or set(map(type, v)) == {int}), f"{name}: ints")  # type(True) is bool
    need(n is None or len(v) == n, f"{name}: {n} entries expected")
    need(not v or (min(v) >= lo and (hi is None or max(v) < hi)), f"{name}: out of range")
    return v


def stop_strings(v: Any) -> list[str]:
    """A request's stop strings (absent: none)."""
    stop = or_default(v, [])
    need(isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) for s in stop), "stop")
    return stop


def sampling_params(params: Any) -> dict:
    """Sampling parameters as the engine reads them (finite, in range)."""
    need(isinstance(params, dict), "sampling params: a map")
    try:
        return SamplingParams.from_dict(params).to_dict()
    except (UserError, TypeError, ValueError, OverflowError) as e:  # int(inf) overflows
        raise ProtocolError(f"sampling params: {e}") from None


# ---- control requests ------------------------------------------------------------------------
def read_layout_request(msg: Any) -> int | None:
    """The epoch of a `ready` report, or None for a query of the committed layout."""
    need(isinstance(msg, dict), "layout: a map")
    if "ready" not in msg:
        return None
    need(is_int(msg["ready"], 1), "layout: ready names an epoch")
    return msg["ready"]


def read_trace_request(msg: Any) -> tuple[str, bool]:
    """(request id, only this node's spans?)"""
    need(isinstance(msg, dict), "trace: a map")
    return request_id(msg.get("rid")), msg.get("local") is True

"""The error vocabulary of hexswarm's wire protocols: every code an error frame carries (`{"error": {"code",
"message"}}`), and in one table what each means to the HTTP API (status, OpenAI error type), to the metrics (a
request's `outcome` label) and to a client (whether an accepted request is submitted again through the next
entry).  A new code is added here, once."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ErrorCode(str, Enum):
    """A str: frames carry the plain string, and a code read off the wire compares equal to its member.  (str,
    Enum) rather than 3.11's StrEnum: the package runs on 3.10; str() and repr() give the plain string, as logs
    and messages want.)"""

    __str__ = str.__str__
    __format__ = str.__format__
    __repr__ = str.__repr__

    BAD_REQUEST = "bad_request"  # the message breaks a protocol or one of its limits
    FORBIDDEN = "forbidden"  # the sender may not do this (not admitted, or not its request)
    BUSY = "busy"  # full for now; the message says when to retry
    INTERNAL = "internal"  # a bug on the answering node (its log has the traceback)
    NO_LAYOUT = "no_layout"  # no layout serves the model yet
    NO_HEAD = "no_head"  # no head answered the entry
    NOT_HEAD = "not_head"  # the asked peer is not the head; the message names the one it knows
    NOT_FOUND = "not_found"  # a checkpoint block the peer does not hold
    UNKNOWN_REQUEST = "unknown_request"  # a trace of a request that did not enter here (or is forgotten)
    FAILED = "failed"  # the request failed on every pipeline it was placed on
    TIMEOUT = "timeout"  # the request did not finish (or was not placed again) by its deadline
    REPLACED = "replaced"  # the request was submitted again; this stream is abandoned


@dataclass(frozen=True)
class Meaning:
    http_status: int
    http_type: str  # the OpenAI error type
    outcome: str  # the `outcome` label of hexswarm_requests_total
    retry: bool = False  # an accepted request that met it goes to the next entry (api/client.py)


UNAVAILABLE = (503, "service_unavailable_error")
SERVER_ERROR = (500, "server_error")  # what a code with no meaning of its own (or an unknown one) is to HTTP

MEANINGS: dict[ErrorCode, Meaning] = {
    ErrorCode.BAD_REQUEST: Meaning(400, "invalid_request_error", "bad_request"),
    ErrorCode.FORBIDDEN: Meaning(403, "permission_error", "forbidden"),
    ErrorCode.BUSY: Meaning(429, "rate_limit_error", "busy", retry=True),
    ErrorCode.INTERNAL: Meaning(*SERVER_ERROR, "error"),
    ErrorCode.NO_LAYOUT: Meaning(*UNAVAILABLE, "unavailable", retry=True),
    ErrorCode.NO_HEAD: Meaning(*UNAVAILABLE, "unavailable", retry=True),
    ErrorCode.NOT_HEAD: Meaning(*SERVER_ERROR, "error"),
    ErrorCode.NOT_FOUND: Meaning(*SERVER_ERROR, "error"),
    ErrorCode.UNKNOWN_REQUEST: Meaning(*SERVER_ERROR, "error"),
    ErrorCode.FAILED: Meaning(*UNAVAILABLE, "failed"),
    ErrorCode.TIMEOUT: Meaning(504, "timeout_error", "timeout"),
    ErrorCode.REPLACED: Meaning(*SERVER_ERROR, "error", retry=True),
}
_UNKNOWN = Meaning(*SERVER_ERROR, "error")


def meaning(code: object) -> Meaning:
    """What `code` (a member or a string off the wire, maybe none of ours) means; an unknown code is a server
    error to HTTP and an `error` outcome."""
    try:
        return MEANINGS[ErrorCode(code)]
    except ValueError:
        return _UNKNOWN

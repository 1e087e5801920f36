"""Request/response protocols on libp2p streams: ids, a server-side `serve`, a client-side `request`.

One request per stream: the client writes one frame (the request message),
the server answers one frame and closes. The answer is an envelope:
``{"ok": reply}`` or ``{"error": {"code": str, "message": str}}``.
A handler is ``async def handler(msg, remote_peer_id) -> reply``; whatever a
peer sends (garbage, truncated frames, wrong types) ends in an error frame or
a closed stream, never in a dead server.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from hexswarm.errors import ProtocolError
from hexswarm.net import codec, failures
from hexswarm.net.error_codes import ErrorCode
from hexswarm.net.framing import DEFAULT_READ_TIMEOUT_S, read_frame, write_frame

log = logging.getLogger(__name__)

Handler = Callable[[Any, Any], Awaitable[Any]]  # (msg, remote PeerID) -> reply
PeerFilter = Callable[[Any], bool]  # remote PeerID -> may it use this protocol?

DEFAULT_REQUEST_TIMEOUT_S = 10.0
DEFAULT_MAX_REQUEST = 1 << 20  # control messages; bulk protocols pass their own limit
DEFAULT_MAX_CONCURRENT = 64
DEFAULT_RATE_PER_PEER = 100.0  # requests per second, per peer and protocol (bursts of twice that)
_CLOSE_TIMEOUT_S = 1.0


def protocol_id(name: str, version: int) -> str:
    """The versioned id ``/hexswarm/<name>/<version>``."""
    return f"/hexswarm/{name}/{version}"


# Every hexswarm protocol id, in one place (torch-free: clients import these).
PING = protocol_id("ping", 1)
PEERS = protocol_id("peers", 1)
RECORDS = protocol_id("records", 1)  # a node's table as signed records, for a newcomer (swarm/node.py)
SUBMIT = protocol_id("submit", 1)  # client -> entry node (serve/submit.py)
SUBMIT2 = protocol_id("submit", 2)  # submit/1 plus keepalive frames while the entry has nothing else to send
SUBMIT3 = protocol_id("submit", 3)  # a session: many submit/2 requests of one client on one stream (submit_session.py)
DISPATCH = protocol_id("dispatch", 1)  # entry -> head (serve/serving.py)
LAYOUT = protocol_id("layout", 1)  # ready reports and epoch queries (serve/serving.py)
STATUS = protocol_id("status", 1)  # a node's view of head and layout (serve/serving.py)
TRACE = protocol_id("trace", 1)  # a request's spans (serve/submit.py)
PIPE = protocol_id("pipe", 2)  # pipeline frames over libp2p streams (serve/pipe.py); 2: ragged rows, batched events
DIRECT = protocol_id("direct", 2)  # opening the direct data path (net/direct.py); carries pipe/2 messages
WEIGHTS = protocol_id("weights", 1)  # a checkpoint's manifest and blocks by content hash (swarm/weights.py)


class RequestError(Exception):
    """A request got no usable reply."""


class RemoteError(RequestError):
    """The peer answered with an error frame."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class StreamOpenFailed(RequestError):
    """A stream to the peer could not be opened (no connection, or protocol negotiation failed on one)."""


class RequestTimeout(RequestError):
    pass


def error_frame(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message[:500]}}


def unwrap_reply(envelope: Any) -> Any:
    if isinstance(envelope, dict) and "ok" in envelope:
        return envelope["ok"]
    if isinstance(envelope, dict) and isinstance(envelope.get("error"), dict):
        err = envelope["error"]
        raise RemoteError(str(err.get("code", "?")), str(err.get("message", "")))
    raise RequestError(f"malformed reply envelope of type {type(envelope).__name__}")


async def close_quietly(stream) -> None:
    with trio.move_on_after(_CLOSE_TIMEOUT_S):
        try:
            await stream.close()
        except Exception:
            pass


async def reset_quietly(stream) -> None:
    with trio.move_on_after(_CLOSE_TIMEOUT_S):
        try:
            await stream.reset()
        except Exception:
            pass


def remote_peer_id(stream):
    return stream.muxed_conn.peer_id


def make_stream_handler(
    protocol: str,
    handler: Handler,
    *,
    allow: PeerFilter | None = None,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
    max_request: int = DEFAULT_MAX_REQUEST,
    max_reply: int = codec.DEFAULT_MAX_FRAME,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    rate_per_peer: float = DEFAULT_RATE_PER_PEER,
    max_per_peer: int | None = None,
) -> Callable[[Any], Awaitable[None]]:
    """Wrap a message handler into a libp2p stream handler with all the defences."""
    from hexswarm.net.ratelimit import PeerRateLimiter, PeerSlots

    limiter = trio.CapacityLimiter(max_concurrent)
    per_peer = PeerRateLimiter(rate_per_peer, 2 * rate_per_peer)
    # one peer holds at most this many of the protocol's streams at once (default: a quarter)
    per_peer_open = PeerSlots(max_per_peer or max(1, max_concurrent // 4))

    async def answer(stream, envelope: dict) -> None:
        await write_frame(stream, envelope, timeout=read_timeout, max_size=max_reply)

    async def on_stream(stream) -> None:
        remote = remote_peer_id(stream)
        holds = False
        try:
            if allow is not None and not allow(remote):
                await answer(stream, error_frame(ErrorCode.FORBIDDEN, "peer not allowed"))
                return
            holds = per_peer_open.acquire(str(remote))
            if not holds:  # one peer cannot take the whole protocol's share of streams
                await answer(stream, error_frame(ErrorCode.BUSY,
                                                 f"{protocol}: {per_peer_open.limit} requests of yours in flight"))
                return
            if not per_peer.allow(str(remote)):
                retry = per_peer.retry_after_s(str(remote))
                await answer(stream, error_frame(ErrorCode.BUSY, f"rate limit: retry after {retry:.2f} s"))
                return
            try:
                limiter.acquire_nowait()
            except trio.WouldBlock:
                await answer(stream, error_frame(ErrorCode.BUSY, f"{protocol} has {max_concurrent} requests in flight"))
                return
            try:
                try:
                    msg = await read_frame(stream, timeout=read_timeout, max_size=max_request)
                except ProtocolError as e:
                    log.debug("%s from %s: bad frame: %s", protocol, remote, e)
                    await answer(stream, error_frame(ErrorCode.BAD_REQUEST, str(e)))
                    return
                try:
                    reply = await handler(msg, remote)
                except RemoteError as e:  # the handler's own refusal, with its code
                    await answer(stream, error_frame(e.code, e.message))
                    return
                except (ProtocolError, TypeError, KeyError, ValueError, AttributeError, IndexError) as e:
                    # Untrusted input of the wrong shape lands here.
                    log.debug("%s from %s: bad request: %s: %s", protocol, remote, type(e).__name__, e)
                    await answer(stream, error_frame(ErrorCode.BAD_REQUEST, f"{type(e).__name__}: {e}"))
                    return
                except Exception as e:
                    failures.unexpected(protocol, remote, e)
                    await answer(stream, error_frame(ErrorCode.INTERNAL, f"{type(e).__name__}"))
                    return
                try:
                    await answer(stream, {"ok": reply})
                except ProtocolError as e:
                    if "exceeds" in str(e) or "cannot encode" in str(e):
                        log.error("%s reply not sendable: %s", protocol, e)
                        await answer(stream, error_frame(ErrorCode.INTERNAL, "reply not sendable"))
                    else:
                        raise
            finally:
                limiter.release()
        except ProtocolError as e:
            # The peer went away or stalled while we answered: nothing left to tell it.
            log.debug("%s with %s ended: %s", protocol, remote, e)
            await reset_quietly(stream)
        except Exception as e:
            failures.unexpected(protocol, remote, e)
            await reset_quietly(stream)
        finally:
            if holds:
                per_peer_open.release(str(remote))
            await close_quietly(stream)

    return on_stream


def serve(host, protocol: str, handler: Handler, **options: Any) -> None:
    """Answer `protocol` on `host` with `handler` (options: see make_stream_handler)."""
    from libp2p.custom_types import TProtocol

    host.set_stream_handler(TProtocol(protocol), make_stream_handler(protocol, handler, **options))


async def request(
    host,
    peer_id,
    protocol: str,
    msg: Any,
    timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    max_reply: int = codec.DEFAULT_MAX_FRAME,
) -> Any:
    """Send one request and return the reply; raises RequestError subclasses."""
    from libp2p.custom_types import TProtocol

    with trio.move_on_after(timeout):
        try:
            stream = await host.new_stream(peer_id, [TProtocol(protocol)])
        except Exception as e:
            raise StreamOpenFailed(f"cannot open {protocol} to {peer_id}: {type(e).__name__}: {e}") from None
        try:
            await write_frame(stream, msg, timeout=timeout)
            envelope = await read_frame(stream, timeout=timeout, max_size=max_reply)
        except ProtocolError as e:
            await reset_quietly(stream)
            raise RequestError(f"{protocol} to {peer_id}: {e}") from None
        await close_quietly(stream)
        return unwrap_reply(envelope)
    raise RequestTimeout(f"{protocol} to {peer_id}: no reply within {timeout:g} s")

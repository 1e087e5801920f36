"""`/hexswarm/submit/3`: a client's many requests on one stream (a submit session), both ends.

Through `/hexswarm/submit/2` every request is a new yamux stream, and every engine step writes one frame on
each request's stream: at 64 concurrent requests an entry's event loop was 89-93% busy, a quarter of it opening
streams and another quarter one yamux frame, one Noise encryption and one socket send per stream per step
(docs/BENCHMARKS.md run 22).  A session carries all of one client connection's requests: the token frames of all
of them that one step produced go out as one write, and a request costs no stream.  It is the libp2p twin of the
HTTP worker channel (api/http_worker.py), and the request's messages and frames are submit/2's.

Client -> entry, codec frames on the session's stream, each one message:
  {"submit": N, "msg": <a submit/2 request message>}     (N: the client's number for it on this session, an int)
  {"cancel": N}                                          (the caller gave up on request N: its work stops)
Entry -> client:
  {"n": N, "frame": <a submit/2 frame>}                  (accepted, waiting, token, then done or error, which
                                                          ends N; frames of one request stay in order)
  {"keepalive": true}                                    (whenever the session has a request and the entry
                                                          sent nothing for KEEPALIVE_S)
  {"error": {"code", "message"}}                         (the session itself is malformed; the stream ends)
Each request is admitted, bounded and served exactly as on its own submit/2 stream (`SubmitService.serve_peer`:
the client certificate, the per-peer limit of open requests, the take-over rule, metrics).  The session ends when
the client closes or resets its stream; every request still running on it is then cancelled, as a submit/2
request whose stream breaks.

A client (`ClientSession`, used by `SwarmClient`) that hears nothing on a session with requests for `silent_s`
takes the entry for dead or frozen: the session is reset and each of its requests fails over as a submit/2
request does.  An entry that does not speak submit/3 (an older install) refuses it at negotiation; the client
then uses submit/2 streams for that entry.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import trio

from hexswarm.errors import ProtocolError, first_leaf
from hexswarm.net import failures
from hexswarm.net.error_codes import ErrorCode
from hexswarm.net.framing import FrameWriter, StreamClosed, read_frame
from hexswarm.net.protocols import close_quietly, error_frame, remote_peer_id, reset_quietly
from hexswarm.net.ratelimit import PeerSlots
from hexswarm.serve.submit import KEEPALIVE_S, MAX_SUBMIT_FRAME

log = logging.getLogger("hexswarm.submit")

MAX_SESSIONS_PER_PEER = 8  # a client needs one per entry; a few more for clients sharing one key
MAX_N = 1 << 62  # request numbers are ints the codec carries


def _request_number(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_N:
        raise ProtocolError(f"a session's request number must be an int in [0, 2^62), not {value!r}")
    return value


# --- the entry's side --------------------------------------------------------------------------------------


class EntrySession:
    """One client's session on this entry: reads its messages, serves each request as a task, writes the frames
    of all of them through one FrameWriter (whatever one step produced goes out in one write)."""

    def __init__(self, service, stream, peer: str):
        self.service, self.stream, self.peer = service, stream, peer
        self.scopes: dict[int, trio.CancelScope] = {}
        self.last_put = trio.current_time()
        self.writer: FrameWriter | None = None

    def put(self, msg: dict) -> None:
        self.writer.put(msg)
        self.last_put = trio.current_time()

    async def run(self) -> None:
        with trio.CancelScope() as work:
            self.writer = FrameWriter(self.stream, work)
            async with trio.open_nursery() as outer:
                outer.start_soon(self.writer.run)
                last = None
                try:
                    async with trio.open_nursery() as requests:
                        requests.start_soon(self._keep_alive)
                        try:
                            await self._read(requests)
                        except ProtocolError as e:  # malformed: said once, then the session ends
                            last = error_frame(ErrorCode.BAD_REQUEST, str(e))
                        # the client is gone (or broke the protocol): its requests' work stops
                        requests.cancel_scope.cancel()
                finally:
                    if last is not None:
                        self.writer.put(last)
                    self.writer.close()  # the writer sends what is queued, then ends
        if self.writer.error is not None:
            log.debug("submit session of %s: %s", self.peer, self.writer.error)

    async def _read(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                msg = await read_frame(self.stream, timeout=math.inf, max_size=MAX_SUBMIT_FRAME)
            except StreamClosed:  # EOF or reset: the client ended the session
                return
            if not isinstance(msg, dict):
                raise ProtocolError(f"a session message must be a map, not {type(msg).__name__}")
            if "submit" in msg:
                n = _request_number(msg["submit"])
                if n in self.scopes:
                    raise ProtocolError(f"request number {n} is already running on this session")
                self.scopes[n] = trio.CancelScope()
                nursery.start_soon(self._serve, n, msg.get("msg"))
            elif "cancel" in msg:
                scope = self.scopes.get(_request_number(msg["cancel"]))
                if scope is not None:
                    scope.cancel()
            else:
                raise ProtocolError(f"unknown session message with keys {sorted(map(str, msg))[:8]}")

    async def _serve(self, n: int, msg: Any) -> None:
        service, peer = self.service, self.peer

        def put(frame: dict) -> None:
            for one in frame.get("batch") or [frame]:  # the wire carries one frame per token
                self.put({"n": n, "frame": one})

        if not service.open_streams.acquire(peer):  # the same bound as submit/2's streams per peer
            put(error_frame(ErrorCode.BUSY, f"busy: {service.open_streams.limit} submit requests of yours are open; "
                                            "retry after 1 s"))
            self.scopes.pop(n, None)
            return
        try:
            with self.scopes[n]:
                put(await service.serve_peer(peer, msg, put))
        except Exception as e:  # one line and this request answered; never the session or the node
            failures.unexpected("submit session", peer, first_leaf(e))
            put(error_frame(ErrorCode.INTERNAL, f"{type(first_leaf(e)).__name__}"))
        finally:
            service.open_streams.release(peer)
            self.scopes.pop(n, None)

    async def _keep_alive(self) -> None:
        """While requests run, a keepalive whenever the session was silent for KEEPALIVE_S."""
        while True:
            quiet = trio.current_time() - self.last_put
            if quiet < KEEPALIVE_S:
                await trio.sleep(KEEPALIVE_S - quiet)
            elif self.scopes:
                self.put({"keepalive": True})
            else:  # an idle session: look again in a while (no wake-up every few ms)
                await trio.sleep(KEEPALIVE_S / 4)


async def on_session_stream(service, sessions: PeerSlots, stream) -> None:
    """The submit/3 stream handler (SubmitService.register)."""
    peer = str(remote_peer_id(stream))
    if not sessions.acquire(peer):
        await reset_quietly(stream)  # a client needs one session per entry: this one is refused outright
        return
    try:
        await EntrySession(service, stream, peer).run()
    except Exception as e:  # one line and this session closed; never the node
        failures.unexpected("submit session", peer, first_leaf(e))
        await reset_quietly(stream)
    finally:
        sessions.release(peer)
        await close_quietly(stream)


# --- the client's side -------------------------------------------------------------------------------------


class SessionLost(Exception):
    """The session broke or its entry went silent; every request on it ends with this."""


class ClientSession:
    """A client's submit/3 session with one entry.  `run` (in the client's nursery) reads frames and hands each
    to its request; `open` starts a request and gives the channel its frames arrive on."""

    def __init__(self, stream, addr: str, silent_s: float):
        self.stream, self.addr, self.silent_s = stream, addr, silent_s
        self.requests: dict[int, trio.MemorySendChannel] = {}
        self.lost: str | None = None
        self.heard = trio.current_time()
        self._next = 0
        self._scope = trio.CancelScope()
        self.writer = FrameWriter(stream, self._scope)

    def open(self, request: dict) -> tuple[int, trio.MemoryReceiveChannel]:
        if self.lost is not None:
            raise SessionLost(self.lost)
        n, self._next = self._next, self._next + 1
        send, receive = trio.open_memory_channel(math.inf)
        if not self.requests:  # silence counts from the first request in flight, not from an idle session
            self.heard = trio.current_time()
        self.requests[n] = send
        self.writer.put({"submit": n, "msg": request})
        return n, receive

    def close(self, n: int, finished: bool) -> None:
        """Request `n` is over for its caller; unless it finished, the entry is told to stop its work."""
        if self.requests.pop(n, None) is not None and not finished and self.lost is None:
            self.writer.put({"cancel": n})

    async def run(self, on_lost: Callable[["ClientSession"], None]) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.writer.run)
                nursery.start_soon(self._watch)
                await self._read()
                nursery.cancel_scope.cancel()
        self.lost = self.lost or (f"the session with {self.addr} broke: {self.writer.error}" if self.writer.error
                                  else f"{self.addr} ended the session")
        on_lost(self)
        for send in self.requests.values():
            send.send_nowait(SessionLost(self.lost))
        self.requests.clear()
        self.writer.close()
        await reset_quietly(self.stream)

    async def _read(self) -> None:
        try:
            while True:
                frame = await read_frame(self.stream, timeout=math.inf, max_size=MAX_SUBMIT_FRAME)
                self.heard = trio.current_time()
                if not isinstance(frame, dict):
                    raise ProtocolError("a malformed session frame")
                if "n" in frame:
                    send = self.requests.get(frame["n"])
                    if send is not None and isinstance(frame.get("frame"), dict):
                        send.send_nowait(frame["frame"])
                elif "error" in frame:
                    raise ProtocolError(f"the entry ended it: {frame['error']}")
        except ProtocolError as e:
            self.lost = self.lost or f"the session with {self.addr} broke: {e}"

    async def _watch(self) -> None:
        """An entry silent for `silent_s` while requests wait (it sends keepalives) is dead or frozen."""
        while True:
            await trio.sleep(min(1.0, self.silent_s / 4))
            if self.requests and trio.current_time() - self.heard >= self.silent_s:
                self.lost = f"{self.addr} sent nothing for {self.silent_s:g} s (dead or frozen)"
                self._scope.cancel()
                return

"""Placing a request over the pipe: a `dispatch` frame from the entry to the head, a `placed` frame back.

`/hexswarm/dispatch/1` opens a libp2p stream per request (and per retry): a multistream negotiation that a
busy or just-restarted head answers late or never (py-libp2p waits 30 s), so under churn entries could not
place requests again for minutes (chaos run 2026-11-26: 80 requests "not placed again within 600 s: cannot
open /hexswarm/dispatch/1").  The pipe is the link the peers keep anyway (direct encrypted TCP, or one libp2p
stream), so a placement costs two frames on it.

- Entry: `ask(head, msg, timeout)` sends `{"kind": "dispatch", ...the dispatch fields}` and waits for the
  `placed` frame of that (request id, attempt) from that head.  It gives up (RequestError) when the link to
  the head cannot be made (the pipe's send-failure callback), when the head stops being the first in this
  node's head order (it went down or the term turned), or after `timeout`.  A head that places the request
  after the entry gave up costs nothing: every ask takes a new attempt number, and the entry cancels the
  work of attempts it is not waiting for.
- Head: each `dispatch` frame (decoded by the pipe as the stream protocol decodes it, serve/messages.py;
  the sender must be the entry) is placed in a task of its own (`Server.dispatch`, which may wait for a live
  pipeline), at most MAX_PER_ENTRY at once per entry, and answered `{"kind": "placed", "rid", "attempt",
  "placement"}` or `{..., "error": {"code", "message"}}`.
"""

from __future__ import annotations

import logging

import trio

from hexswarm.net import failures
from hexswarm.net.error_codes import ErrorCode
from hexswarm.net.protocols import DEFAULT_MAX_CONCURRENT, RemoteError, RequestError
from hexswarm.serve.messages import DispatchRequest, PlacementAnswer

log = logging.getLogger("hexswarm.placement")

MAX_PER_ENTRY = DEFAULT_MAX_CONCURRENT  # placements of one entry a head works on at once
HEAD_CHECK_S = 0.5  # how often a waiting ask checks that its head is still the head


class PipeDispatch:
    def __init__(self, server):
        self.server = server
        # entry: (rid, attempt) -> [head asked, answer (placement or exception), answered]
        self._waiting: dict[tuple[str, int], list] = {}
        # head: placements in progress per entry
        self._working: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None

    def register(self, pipe, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        pipe.on(DispatchRequest, self._on_dispatch)
        pipe.on(PlacementAnswer, self._on_placed)

    # ---- entry side ------------------------------------------------------------------------
    async def ask(self, head: str, msg: dict, timeout: float) -> dict:
        """The head's placement of `msg`; RemoteError when it refused, RequestError when it did not answer."""
        key = (msg["rid"], int(msg["attempt"]))
        waiter = self._waiting[key] = [head, None, trio.Event()]
        try:
            self.server.pipe.send(head, {"kind": "dispatch", **msg})
            with trio.move_on_after(timeout):
                while not waiter[2].is_set():
                    with trio.move_on_after(HEAD_CHECK_S):
                        await waiter[2].wait()
                    if not waiter[2].is_set() and self.server.head_order()[:1] != [head]:
                        raise RequestError(f"head {head[:16]} is no longer the head (down, or the term turned)")
        finally:
            self._waiting.pop(key, None)
        answer = waiter[1]
        if answer is None:
            raise RequestError(f"no placement from head {head[:16]} within {timeout:g} s")
        if isinstance(answer, Exception):
            raise answer
        return answer

    def _on_placed(self, answer: PlacementAnswer, sender: str) -> None:
        waiter = self._waiting.get((answer.rid, answer.attempt))
        if waiter is None or waiter[0] != sender or waiter[2].is_set():
            return  # given up on, or not from the head asked
        waiter[1] = answer.placement if answer.error is None else RemoteError(*answer.error)
        waiter[2].set()

    def send_failed(self, peer: str, msg: dict) -> None:
        """A dispatch frame could not be sent: the head is unreachable, its ask ends now."""
        waiter = self._waiting.get((msg.get("rid"), msg.get("attempt")))
        if waiter is not None and waiter[0] == peer and not waiter[2].is_set():
            waiter[1] = RequestError(f"head {peer[:16]} unreachable")
            waiter[2].set()

    # ---- head side -------------------------------------------------------------------------
    def _on_dispatch(self, req: DispatchRequest, sender: str) -> None:
        if self._working.get(sender, 0) >= MAX_PER_ENTRY:
            self._reply(sender, req, error=(ErrorCode.BUSY, f"busy: {MAX_PER_ENTRY} placements of yours in progress"))
            return
        self._working[sender] = self._working.get(sender, 0) + 1
        self._nursery.start_soon(self._place_for, sender, req)

    async def _place_for(self, entry: str, req: DispatchRequest) -> None:
        try:
            self._reply(entry, req, placement=await self.server.dispatch(req.to_dict()))
        except RemoteError as e:
            self._reply(entry, req, error=(e.code, e.message))
        except Exception as e:  # a bug placing one request must not end the node
            failures.unexpected("pipe dispatch", entry, e)
            self._reply(entry, req, error=(ErrorCode.INTERNAL, type(e).__name__))
        finally:
            self._working[entry] -= 1
            if not self._working[entry]:
                del self._working[entry]

    def _reply(self, entry: str, req: DispatchRequest, placement: dict | None = None,
               error: tuple[str, str] | None = None) -> None:
        msg = {"kind": "placed", "rid": req.rid, "attempt": req.attempt}
        if error is not None:
            msg["error"] = {"code": error[0], "message": error[1][:500]}
        else:
            msg["placement"] = placement
        self.server.pipe.send(entry, msg)

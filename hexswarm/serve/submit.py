"""`/hexswarm/submit/1`: how a client's prompt enters the swarm and its tokens come back.

Client -> entry node, one frame:
  {"prompt": str, "max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float,
   "seed": int, "stop": [str], "stream": bool, "request_id": str (optional),
   "ignore_eos": bool (optional: generate past end-of-sequence tokens up to max_new_tokens, as vLLM's
   option; benchmarks use it for an exact output length),
   "resumed": bool (optional: a client's failover of a request another entry accepted, or a resubmission
   of one it gave up on here; placed like an entry's resume: never refused as busy, waits for a layout),
   "timeout_s": number (optional: how long the client waits for it; the entry ends it then, and refuses a new
   request the swarm cannot serve well within it: serve/backlog.py),
   "resume_tokens": [int] (optional, with "resumed" only: the tokens the client already has, in order; the new
   entry's pipeline continues after them instead of generating them again, and its token frames start at
   their count)}
Entry node -> client, frames in order:
  {"keepalive": true}                                  (`/hexswarm/submit/2` only: every KEEPALIVE_S while the
                                                        entry sends nothing else, from the request's arrival
                                                        on; a client that hears nothing for longer takes the
                                                        entry for dead or frozen and submits again elsewhere)
  {"accepted": {"request_id", "epoch", "replica", "head", "stages"}}
  {"waiting": {"request_id", "tokens", "reason"}}     (while an accepted request waits to be placed again:
                                                        the client knows it is alive; clients ignore it)
  {"token": int, "index": int, "text": str}            (only with stream: true; "text" is what the token
                                                        adds, from one IncrementalDetokenizer per request: an
                                                        incomplete UTF-8 character waits for a later frame, and
                                                        the done frame's "text" is the whole output)
  {"done": {...the `generate --json` object, plus request_id, replica, epoch, stages}}
  or, at any point, {"error": {"code": str, "message": str}} and the stream ends.
The entry node tokenizes once, asks the head to place the request, and relays
the token events that the replica's stage 0 sends it.  `/hexswarm/submit/1` is the same without keepalives.

In the swarm a request is its entry's: it travels as `wire_id(request_id)` (the id scoped by the entry's
PeerID), so the same request resubmitted through another entry (a client's failover) never meets the first
entry's copy at a stage 0; that copy ends when its entry sees its client gone (or dies, and stage 0 cannot
deliver its tokens).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
import uuid
from typing import Any, Awaitable, Callable

import trio

from hexswarm.errors import ProtocolError, UserError, first_leaf
from hexswarm.net import failures
from hexswarm.net.error_codes import ErrorCode
from hexswarm.net.ratelimit import PeerSlots
from hexswarm.net.submit_request import RESUME_TOKENS, SubmitRequest
from hexswarm.net.framing import FrameWriter, read_frame, write_frame
from hexswarm.net.protocols import (
    SUBMIT, SUBMIT2, SUBMIT3, TRACE, RemoteError, RequestError, close_quietly,
    error_frame, remote_peer_id, reset_quietly,
)
from hexswarm.runtime.detokenize import IncrementalDetokenizer

log = logging.getLogger("hexswarm.submit")

MAX_SUBMIT_FRAME = 4 << 20
REQUEST_TIMEOUT_S = 600.0
HEALTH_CHECK_S = 0.25  # how often the entry checks that a request's pipeline is alive
STALL_TIMEOUT_S = 60.0  # no token for this long with every peer up: resume elsewhere
# ... unless its stage 0 kept emitting other requests' tokens meanwhile: the request is queued there behind them
# (re-placing it put it at the back of a queue again, over and over, in an overloaded chaos run); at most this long
QUEUED_STALL_S = 4 * STALL_TIMEOUT_S
# a pipeline peer marked down counts as lost only once silent this long past down_after_s (or restarted): on a
# loaded host peers missed heartbeats for a second or two all the time, and each such miss cancelled and
# re-prefilled every request on them (chaos run, load ~16: requests resumed 15 times, 6 tokens apiece)
PEER_LOST_GRACE_S = 3.0
RESUME_BACKOFF_S, MAX_RESUME_BACKOFF_S = 0.5, 8.0  # before a resume, doubling per placement that gave no token
MAX_ATTEMPTS = 16  # pipelines a request may be placed on (tries the head refused do not count)
HISTORY = 10000
KEEPALIVE_S = 2.0  # submit/2: a keepalive frame after this long without another frame
HEAD_BACKOFF_S, MAX_HEAD_BACKOFF_S = 0.5, 8.0  # asking a head that did not answer again: doubling per failure

MAX_CHARS_PER_TOKEN = 64  # a prompt longer than this many characters per servable token is refused untokenized


@dataclass(frozen=True)
class EntryPort:
    """All an entry (SubmitService) uses of its node's serving layer (serving.py builds it): the node's
    membership for peers' state and its host, the model's facts, and the serving calls named below."""

    me: str  # this node's PeerID
    node: Any  # swarm/node.py Node: peer table, requests to peers, the libp2p host, config, admission
    cfg: Any  # the served model's LlamaConfig
    tokenizer: Any
    max_seq_len: int  # the longest sequence a request may reach here: the model's context or the node's bound
    dispatch_wait_s: float  # how long a head waits for a layout before refusing a placement
    # wire id -> RelayInbox of each request this entry relays: the serving layer delivers its token events there
    entries: dict
    head_order: Callable[[], list[str]]  # heads to ask, best first
    dispatch: Callable[[dict], Awaitable[dict]]  # place a request with this node as the head
    ask_head: Callable[..., Awaitable[dict]]  # ask_head(head, msg, timeout=): a placement over the pipe
    send: Callable[[str, dict], None]  # a message to a peer over the pipe (cancels)
    local_spans: Callable[[str], list]  # a request's spans at the stages here (trace)
    tokens_out: Callable[[], int]  # tokens the stage 0s here have emitted (stall check)
    committed: Callable[[], Any]  # the committed SwarmLayout or None
    failed_replicas: Callable[[Any], set]  # replicas of a layout with a stage reported failed
    refusal: Callable[[int, float], str | None]  # why the swarm's backlog refuses a new request (backlog.py)


class RelayInbox:
    """What a request's entry holds for it (`EntryPort.entries`): the messages for its relay task.  While that task
    waits with nothing in hand it lends its `take`, and the current attempt's next token goes to the client from
    the message that brought it: no task switch, timeout scope or channel per token (~13% of the entry's event
    loop in a CPU profile at 32 streams, docs/BENCHMARKS.md run 21).  Anything else, and everything after it
    until the task waits again, goes through the channel in order."""

    __slots__ = ("send", "take")

    def __init__(self, send: trio.MemorySendChannel):
        self.send = send
        self.take: Callable[[dict], bool] | None = None

    def send_nowait(self, msg: dict) -> None:
        take = self.take
        if take is not None:
            try:
                if take(msg):
                    return
            except Exception as e:  # the front end's queue failed (its client is gone): the task meets it next
                log.debug("relay: a token handed on in place failed: %s", e)
        self.take = None  # the task has a message to handle: later ones queue behind it
        self.send.send_nowait(msg)


class SubmitService:
    def __init__(self, port: EntryPort | None):
        self.port = port
        # rid -> where its attempts ran (for `hexswarm trace`); the oldest are forgotten first
        self.history: OrderedDict[str, list[dict]] = OrderedDict()
        # rid -> the peer that submitted it over libp2p (a client may read its own traces), as long as history
        self.submitters: OrderedDict[str, str] = OrderedDict()
        # rid -> (cancel scope, finished) of the request running here: a resubmission takes it over
        self.running: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        self.open_streams = PeerSlots(port.node.config.max_queue if port is not None else 1)
        # wire id -> tokens still owed to the client, for every request this entry holds (backlog.py)
        self._owed: dict[str, int] = {}
        # rid -> the newest attempt number this entry asked a head to place (placed or not: an ask the entry gave up
        # on may still have started at a stage 0, which refuses a repeat), the oldest forgotten first
        self.asked: OrderedDict[str, int] = OrderedDict()
        # head -> (not asked again before, the next back-off): heads that did not answer a placement
        self._head_backoff: dict[str, tuple[float, float]] = {}
        # what measures the requests that enter through the libp2p submit protocols (measure_with)
        self.metrics = None

    def wire_id(self, rid: str) -> str:
        """The id the swarm knows a request `rid` of this entry by: scoped by the entry, so two entries'
        requests of one id (a client failing over) are two requests at a stage 0, never one."""
        return f"{rid}@{self.port.me[-10:]}"

    def owed(self) -> int:
        """Tokens this entry still owes its clients (gossiped as `owed`: serve/backlog.py)."""
        return sum(self._owed.values())

    def _remember(self, rid: str, placement: dict) -> None:
        self.history.setdefault(rid, []).append(placement)
        self.history.move_to_end(rid)
        while len(self.history) > HISTORY:
            self.history.popitem(last=False)

    async def trace(self, rid: str) -> dict:
        """Where request `rid` (which entered here) ran, with each stage's queue, compute and network time."""
        from hexswarm.net.protocols import RequestError

        placements = self.history.get(rid)
        if placements is None:
            raise RemoteError(ErrorCode.UNKNOWN_REQUEST,
                              f"request {rid} did not enter through this node (or is forgotten)")
        spans: list[dict] = []
        wire = self.wire_id(rid)
        for peer in sorted({st["peer"] for p in placements for st in p["stages"]}):
            if peer == self.port.me:
                spans += self.port.local_spans(wire)
                continue
            try:
                spans += (await self.port.node.request(peer, TRACE, {"rid": wire, "local": True}, timeout=5))["spans"]
            except RequestError as e:
                spans.append({"peer": peer, "error": str(e)})
        return {"request_id": rid, "attempts": placements, "spans": spans}

    def register(self) -> None:
        from libp2p.custom_types import TProtocol

        from hexswarm.serve.submit_session import MAX_SESSIONS_PER_PEER, on_session_stream

        self.port.node.host.set_stream_handler(TProtocol(SUBMIT), self._on_stream)
        self.port.node.host.set_stream_handler(TProtocol(SUBMIT2), self._on_stream)
        sessions = PeerSlots(MAX_SESSIONS_PER_PEER)
        self.port.node.host.set_stream_handler(TProtocol(SUBMIT3), partial(on_session_stream, self, sessions))

    def parse(self, msg: Any) -> dict:
        """Check a submit request: its fields as every front end checks them (SubmitRequest), then what depends
        on the model; UserError with a one-line reason."""
        req = SubmitRequest.from_map(msg)
        limit = self.port.max_seq_len
        if len(req.prompt) > MAX_CHARS_PER_TOKEN * limit:  # more text than any tokenization of it could serve
            raise UserError(f"the prompt has {len(req.prompt)} characters; this swarm serves sequences of at most "
                            f"{limit} tokens")
        if req.resume_tokens and max(req.resume_tokens) >= self.port.cfg.vocab_size:
            raise RESUME_TOKENS.error(list(req.resume_tokens))
        timeout = REQUEST_TIMEOUT_S if req.timeout_s is None else req.timeout_s
        return {"rid": req.request_id or uuid.uuid4().hex, "prompt": req.prompt, "params": req.sampling_params(),
                "stop": list(req.stop), "ignore_eos": req.ignore_eos, "max_new_tokens": req.max_new_tokens,
                "client_tokens": list(req.resume_tokens), "stream": req.stream, "resumed": req.resumed,
                "deadline_s": min(timeout, REQUEST_TIMEOUT_S)}

    async def tokenize(self, req: dict) -> dict:
        """The parsed request with its prompt ids and its budget cut to the context; a long prompt is
        tokenized in a worker thread (a 4 MiB prompt took ~3 s, which the event loop must not spend)."""
        tok = self.port.tokenizer
        prompt = req.pop("prompt")
        ids = tok.encode(prompt) if len(prompt) < 8192 else await trio.to_thread.run_sync(tok.encode, prompt)
        limit = self.port.max_seq_len
        if len(ids) >= limit:
            raise UserError(f"the prompt has {len(ids)} tokens; this swarm serves sequences of at most {limit}")
        max_new = min(req["max_new_tokens"], limit - len(ids))
        if len(req.get("client_tokens") or []) > max_new:
            raise UserError(f"'resume_tokens' has more tokens than the {max_new} this prompt leaves room for")
        return {**req, "prompt_ids": ids, "max_new_tokens": max_new}

    async def place(self, req: dict) -> dict:
        """Ask the head (trying the next in line if it is gone) to place the request."""
        port = self.port
        msg = {k: req[k] for k in ("prompt_ids", "params", "max_new_tokens", "stop")}
        if req.get("ignore_eos"):
            msg["ignore_eos"] = True
        msg["rid"] = self.wire_id(req["rid"])
        msg["entry"] = port.me
        msg["resume_tokens"] = req.get("resume_tokens") or []
        msg["resumed"] = bool(req.get("resumed"))
        tried: set[str] = set()
        deadline = trio.current_time() + port.dispatch_wait_s + 10
        last_error = "no head reachable"
        while trio.current_time() < deadline:
            order = [h for h in port.head_order() if h not in tried] or port.head_order()
            head = order[0]
            if head != port.me and not await self._head_backed_off(head, deadline):
                break
            # every ask takes a new attempt number: a head that places an attempt after this entry gave up on
            # it (no answer in time) cannot start it beside the next one; its tokens are cancelled as stale
            req["attempts"] = msg["attempt"] = max(req.get("attempts", 0), self.asked.get(req["rid"], 0)) + 1
            self.asked[req["rid"]] = msg["attempt"]
            self.asked.move_to_end(req["rid"])
            while len(self.asked) > HISTORY:
                self.asked.popitem(last=False)
            try:
                if head == port.me:
                    placement = await port.dispatch(msg)
                else:
                    placement = await port.ask_head(head, msg, timeout=port.dispatch_wait_s + 5)
                self._head_backoff.pop(head, None)
                self._remember(req["rid"], placement)
                req["placed"] = req.get("placed", 0) + 1
                # one line per attempt: where a request ran, for tracing a lost one through the logs
                log.info("request %s attempt %d placed on epoch %s replica %s (stage 0 %s)", req["rid"],
                         msg["attempt"], placement["epoch"], placement["replica"], placement["stages"][0]["peer"])
                return placement
            except RemoteError as e:
                self._head_backoff.pop(head, None)  # it answered
                if e.code == ErrorCode.NO_LAYOUT or (e.code == ErrorCode.BUSY and not req.get("resumed")):
                    raise
                last_error = str(e)
                tried.add(head)
            except RequestError as e:
                last_error = str(e)
                tried.add(head)
                self._head_failed(head)
            if len(tried) >= len(port.head_order()):
                tried.clear()
                await trio.sleep(0.5)
        raise RemoteError(ErrorCode.NO_HEAD, last_error)

    async def _head_backed_off(self, head: str, deadline: float) -> bool:
        """Wait until `head` may be asked again (it did not answer lately); False if not before `deadline`.
        Shared by every request of this entry: under churn, a head that cannot be reached is not asked by each
        waiting request several times a second (that load kept a busy head from answering at all)."""
        until = self._head_backoff.get(head, (0.0, 0.0))[0]
        if until > deadline:
            return False
        await trio.sleep_until(until)
        return True

    def _head_failed(self, head: str) -> None:
        until, delay = self._head_backoff.get(head, (0.0, HEAD_BACKOFF_S / 2))
        if until > trio.current_time():
            return  # another request's ask of the same round failed first: one round, one doubling
        delay = min(2 * delay, MAX_HEAD_BACKOFF_S)
        self._head_backoff[head] = (trio.current_time() + delay, delay)
        if len(self._head_backoff) > 1024:  # peers named by any view: forget those no longer backing off
            now = trio.current_time()
            self._head_backoff = {h: v for h, v in self._head_backoff.items() if v[0] > now}

    async def serve(self, msg: Any, emit: Callable[[dict], Awaitable[None]], text: bool | None = None,
                    put: Callable[[dict], None] | None = None) -> dict:
        """Run one request given as a submit message; `emit` gets the accepted and token frames
        as they happen; returns the final frame ({"done": ...} or {"error": ...}).
        Used by the libp2p submit protocol and by the HTTP API.  text=False: token frames without
        their text (a caller that only times the tokens; no detokenizing per token).  `put`, from a
        front end that only queues its frames: takes token frames without blocking, straight from the
        message that brought them (RelayInbox)."""
        port = self.port
        try:
            req = await self.tokenize(self.parse(msg))
        except UserError as e:
            return error_frame(ErrorCode.BAD_REQUEST, str(e))
        rid = req["rid"]
        wire = self.wire_id(rid)
        if rid in self.running and req["resumed"]:
            await self._take_over(rid)  # its client gave up on that stream and submitted again
        if wire in port.entries:
            return error_frame(ErrorCode.BAD_REQUEST, f"request {rid} is already running")
        if len(port.entries) >= port.node.config.max_queue:
            return error_frame(ErrorCode.BUSY,
                               f"busy: {len(port.entries)} requests in flight on this node; retry after 1 s")
        if not req["resumed"]:  # a new request joins the swarm's backlog only if it can be served in time
            busy = port.refusal(req["max_new_tokens"], req["deadline_s"])
            if busy is not None:
                return error_frame(ErrorCode.BUSY, busy)
        # attempts go on from this entry's earlier ones for the id: stage 0 refuses a repeated attempt
        req["attempts"] = max([p["attempt"] for p in self.history.get(rid, [])], default=0)
        send, receive = trio.open_memory_channel(math.inf)
        inbox = port.entries[wire] = RelayInbox(send)
        self._owed[wire] = req["max_new_tokens"]
        scope, finished = self.running[rid] = (trio.CancelScope(), trio.Event())
        try:
            with scope:
                return await self._serve_placed(req, emit, receive, req["stream"] if text is None else text,
                                                inbox if put is not None else None, put)
            return error_frame(ErrorCode.REPLACED, f"request {rid} was submitted again; this stream is abandoned")
        finally:
            port.entries.pop(wire, None)
            self._owed.pop(wire, None)
            self.running.pop(rid, None)
            finished.set()

    async def _serve_placed(self, req: dict, emit, receive, text: bool, inbox: RelayInbox | None = None,
                            put: Callable[[dict], None] | None = None) -> dict:
        rid = req["rid"]
        deadline = trio.current_time() + req.get("deadline_s", REQUEST_TIMEOUT_S)
        if req["resumed"]:  # accepted once already (here or through another entry): waits, never refused
            placement = await self._resume(req, req.get("client_tokens") or [], deadline, emit)
            if "error" in placement:
                return placement
        else:
            try:
                placement = await self.place(req)
            except RemoteError as e:
                return error_frame(e.code, e.message)
        try:
            await emit({"accepted": {"request_id": rid, **placement}})
            final = await self._relay(emit, req, placement, receive, deadline, text, inbox, put)
            if "error" in final:
                log.warning("request %s accepted, ended with %s", rid, final["error"])
            return final
        except BaseException:  # the client went away or we were cancelled: stop the pipeline's work
            self._cancel_placement(rid, self.history.get(rid, [placement])[-1])
            raise

    async def _take_over(self, rid: str) -> None:
        """End the request `rid` running here (its relay and its pipeline's work), for its resubmission."""
        scope, finished = self.running[rid]
        scope.cancel()
        await finished.wait()

    def _note_submitter(self, rid: str, peer: str) -> None:
        self.submitters[rid] = peer
        self.submitters.move_to_end(rid)
        while len(self.submitters) > HISTORY:
            self.submitters.popitem(last=False)

    def _only_own_take_over(self, msg: Any, peer: str) -> Any:
        """A resubmission takes over the request running here only for the peer that submitted it: anyone
        else who knows the id is answered "already running"."""
        if (isinstance(msg, dict) and msg.get("resumed") is True and msg.get("request_id") in self.running
                and self.submitters.get(msg.get("request_id")) != peer):
            return {**msg, "resumed": False}
        return msg

    def _check_submitter(self, remote: str, msg: Any) -> None:
        """With require_client_cert, only admitted nodes and holders of a client certificate may submit."""
        if self.port.node.config.require_client_cert:
            self.port.node.admit_client(remote, msg)

    async def serve_peer(self, peer: str, msg: Any, put: Callable[[dict], None]) -> dict:
        """One request of `peer` through libp2p (its own submit stream or a session, serve/submit_session.py):
        the client certificate, the take-over rule, then `serve` (measured, see measure_with); `put` gets the frames
        before the final one, which is returned."""
        try:
            self._check_submitter(peer, msg)
        except PermissionError as e:
            return error_frame(ErrorCode.FORBIDDEN, str(e))
        msg = self._only_own_take_over(msg, peer)

        async def emit(frame: dict) -> None:
            if "accepted" in frame:
                self._note_submitter(frame["accepted"]["request_id"], peer)
            put(frame)

        if self.metrics is None:
            return await self.serve(msg, emit, put=put)
        return await self.metrics.serve(self.serve, msg, emit, "p2p", put)

    def measure_with(self, metrics) -> None:
        """Measure the requests that enter through the libp2p submit protocols with `metrics` (an EntryMetrics:
        the HTTP API's, on a node that serves HTTP)."""
        self.metrics = metrics

    def cancel(self, rid: str) -> None:
        """Stop the pipeline computing request `rid`'s tokens (its latest placement; best effort): its client
        went away."""
        placements = self.history.get(rid)
        if placements:
            self._cancel_placement(rid, placements[-1])

    async def _on_stream(self, stream) -> None:
        peer = str(remote_peer_id(stream))
        if not self.open_streams.acquire(peer):  # one client cannot hold more streams than the node accepts
            await write_frame(stream, error_frame(ErrorCode.BUSY, f"busy: {self.open_streams.limit} submit streams "
                                                                  "of yours are open; retry after 1 s"))
            await close_quietly(stream)
            return
        try:
            try:
                msg = await read_frame(stream, timeout=10.0, max_size=MAX_SUBMIT_FRAME)
            except ProtocolError as e:
                await write_frame(stream, error_frame(ErrorCode.BAD_REQUEST, str(e)))
                return
            keepalive = str(getattr(stream, "get_protocol", lambda: None)()) == SUBMIT2
            with trio.CancelScope() as work:
                writer = FrameWriter(stream, work)  # token frames queued during a write go out together
                last_put = [trio.current_time()]
                finished = trio.Event()

                def put(frame: dict) -> None:
                    for one in frame.get("batch") or [frame]:  # the wire carries one frame per token
                        writer.put(one)
                    last_put[0] = trio.current_time()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(writer.run)
                    if keepalive:
                        nursery.start_soon(self._keep_alive, writer, last_put, finished)
                    try:
                        writer.put(await self.serve_peer(peer, msg, put))
                    finally:
                        finished.set()
                        writer.close()
            if writer.error is not None:
                raise writer.error
        except ProtocolError as e:  # the client went away
            log.debug("submit stream ended: %s", e)
            await reset_quietly(stream)
        except Exception as e:  # one line and this stream closed; never the node
            failures.unexpected("submit", peer, first_leaf(e))
            await reset_quietly(stream)
        finally:
            self.open_streams.release(peer)
            await close_quietly(stream)

    @staticmethod
    async def _keep_alive(writer: FrameWriter, last_put: list[float], finished: trio.Event) -> None:
        """submit/2: a keepalive frame whenever the request's stream had none for KEEPALIVE_S, so the client
        tells a live entry (however slow the swarm) from a dead or frozen one."""
        while not finished.is_set():
            with trio.move_on_after(max(0.0, last_put[0] + KEEPALIVE_S - trio.current_time())):
                await finished.wait()
            if not finished.is_set() and trio.current_time() - last_put[0] >= KEEPALIVE_S:
                writer.put({"keepalive": True})
                last_put[0] = trio.current_time()

    def _stalled(self, placement: dict, last_progress: float, seen: list) -> bool:
        """No token for STALL_TIMEOUT_S while the attempt's stage 0 emitted none either (its `emitted` count,
        gossiped: serve/backlog.py; `seen`: [count, when it last changed, stage 0]), or none for QUEUED_STALL_S
        however busy stage 0 is."""
        now = trio.current_time()
        stage0 = placement["stages"][0]["peer"]
        if stage0 == self.port.me:
            count = self.port.tokens_out()
        else:
            entry = self.port.node.table.get(stage0)
            count = (getattr(entry.record, "extra", None) or {}).get("emitted") if entry is not None else None
        if count != seen[0] or stage0 != seen[2]:
            seen[:] = [count, now, stage0]
        quiet = now - last_progress
        if quiet <= STALL_TIMEOUT_S:
            return False
        return quiet > QUEUED_STALL_S or count is None or now - seen[1] > STALL_TIMEOUT_S

    def _pipeline_alive(self, placement: dict, incarnations: dict[str, int] | None = None,
                        quiet_s: float = math.inf) -> bool:
        return self._pipeline_lost(placement, incarnations, quiet_s) is None

    def _pipeline_lost(self, placement: dict, incarnations: dict[str, int] | None = None,
                       quiet_s: float = math.inf) -> str | None:
        """Why the placement's pipeline cannot deliver any more, or None: a peer of it unknown, restarted since
        first checked (`incarnations`: its stages, and the request with them, are gone) or silent past the grace
        while the request too has had nothing for that long (`quiet_s`: a token within the grace shows every stage
        alive, whatever the heartbeats of a starved host say), or a stage of it reported failed."""
        node = self.port.node
        for st in placement["stages"]:
            if st["peer"] == self.port.me:
                continue
            entry = node.table.get(st["peer"])
            if entry is None:
                return f"lost peer {st['peer'][:16]} (not in the table)"
            # down_after_s, scaled as the table scales it in large swarms (slower heartbeats there)
            grace = node.table.down_after(entry) + PEER_LOST_GRACE_S
            silent = node.table.seconds_since_seen(entry)
            if silent > grace and quiet_s > grace:
                return f"lost peer {st['peer'][:16]} (silent {silent:.0f} s)"
            if incarnations is not None and incarnations.setdefault(st["peer"], entry.record.incarnation) != \
                    entry.record.incarnation:
                return f"lost peer {st['peer'][:16]} (restarted)"
        layout = self.port.committed()
        if layout is None or layout.epoch != placement["epoch"]:
            return None  # an older epoch: its stages report under it, checked when its layout is known
        if placement["replica"] in self.port.failed_replicas(layout):
            return "a stage reported failed"
        return None

    async def _relay(self, emit, req: dict, placement: dict, receive, deadline: float, text: bool = True,
                     inbox: RelayInbox | None = None, put: Callable[[dict], None] | None = None) -> dict:
        """Relay token events to the client until done; when a peer of the request's pipeline
        goes down (or the pipeline stalls), resume the request elsewhere from the tokens it
        already has: the new stage 0 re-runs prefill over prompt + tokens, and sampling step n
        draws what it would have drawn, so the client sees one output, no token missing or repeated.
        With `inbox` and `put`: while this task waits with nothing in hand, the current attempt's next
        token goes to `put` from the message that brings it (`take` below), without waking this task."""
        port = self.port
        wire = self.wire_id(req["rid"])
        # a client's failover may bring the tokens it has: the pipeline continues after them
        tokens: list[int] = list(req.get("client_tokens") or []) if req.get("resumed") else []
        # one incremental decode per token (not the whole output again per token); tokens are
        # deduplicated by index below, so a resumed attempt feeds it each token once
        detok = IncrementalDetokenizer(port.tokenizer) if req["stream"] and text else None
        if detok is not None:
            for t in tokens:  # the client has their text: the next frames' text continues after it
                detok.push(t)
        if tokens and wire in self._owed:
            self._owed[wire] = max(0, req["max_new_tokens"] - len(tokens))
        attempt = placement["attempt"]
        last_progress = trio.current_time()
        held: dict | None = None  # a message read while gathering a run of tokens, not yet handled
        fruitless = 0  # placements in a row that gave no token
        incarnations: dict[str, int] = {}  # of the placement's peers when first checked
        stage0_seen: list = [None, trio.current_time(), None]  # stage 0's emitted tokens, when they last grew, stage 0

        async def resume() -> dict | None:
            """Place the request again from `tokens`; None when placed (the relay follows the new attempt), else
            the error frame that ends the request."""
            # backing off: a stage 0 still loading its stages (a restarted peer), or a head whose view still has a
            # peer this entry sees down, would use up the request's MAX_ATTEMPTS pipelines in seconds
            nonlocal fruitless, placement, attempt, last_progress
            fruitless += 1
            await trio.sleep(min(RESUME_BACKOFF_S * 2 ** (fruitless - 1), MAX_RESUME_BACKOFF_S))
            placed = await self._resume(req, tokens, deadline, emit)
            if "error" in placed:
                return placed
            placement, attempt, last_progress = placed, placed["attempt"], trio.current_time()
            incarnations.clear()
            return None

        def take(ev: dict) -> bool:
            """The next token of the current attempt from its stage 0: handled here, in the caller's call; True
            if so.  Anything else is the task's (RelayInbox hands it over and stops calling this)."""
            nonlocal last_progress, fruitless
            if not (ev.get("kind") == "event" and ev.get("attempt") == attempt
                    and ev.get("_sender") == placement["stages"][0]["peer"] and ev["index"] == len(tokens)):
                return False
            last_progress, fruitless = trio.current_time(), 0
            frame = self._push(ev["token"], tokens, req["stream"], detok)
            if wire in self._owed:
                self._owed[wire] = max(0, req["max_new_tokens"] - len(tokens))
            if frame is not None:
                put(frame)
            return True

        while trio.current_time() < deadline:
            ev, held = held, None
            if ev is None:
                try:  # an event already queued: no timeout scope (one per token cost the event loop ~10%)
                    ev = receive.receive_nowait()
                except trio.WouldBlock:
                    with trio.move_on_after(HEALTH_CHECK_S):
                        if inbox is not None and put is not None:
                            inbox.take = take
                        try:
                            ev = await receive.receive()
                        finally:
                            if inbox is not None:
                                inbox.take = None
            if (ev is not None and ev.get("attempt") == attempt
                    and ev.get("_sender") != placement["stages"][0]["peer"]):
                continue  # only the attempt's stage 0 speaks for it: a peer that knows the id cannot inject
            current = ev is not None and int(ev.get("attempt", -1)) == attempt
            gap = self._events_lost(ev, tokens) if current else None
            if not current or gap:
                if ev is not None and not gap:  # a message from an abandoned attempt: stop that work
                    self._cancel(ev, sender=ev.get("_sender"))
                stalled = self._stalled(placement, last_progress, stage0_seen)
                lost = gap or self._pipeline_lost(placement, incarnations, trio.current_time() - last_progress)
                if lost is None and not stalled:
                    continue
                if req["placed"] >= MAX_ATTEMPTS:
                    return error_frame(ErrorCode.FAILED, f"request {req['rid']} failed on {req['placed']} pipelines")
                why = lost if gap or not stalled else "stalled"
                log.warning("request %s: pipeline of epoch %s replica %s %s after %d tokens; resuming",
                            req["rid"], placement["epoch"], placement["replica"], why, len(tokens))
                self._cancel_placement(req["rid"], placement)
                if (end := await resume()) is not None:
                    return end
                continue
            last_progress = trio.current_time()
            if ev["kind"] == "event":
                # every token already queued goes out in one frame batch: when the event loop falls behind,
                # the client's writes (HTTP's above all) are paid per batch, not per token
                had = len(tokens)
                frames, held = self._take_tokens(ev, receive, tokens, req["stream"], detok,
                                                 placement["stages"][0]["peer"])
                if len(tokens) > had:
                    fruitless = 0
                    if wire in self._owed:
                        self._owed[wire] = max(0, req["max_new_tokens"] - len(tokens))
                if frames:
                    await emit(frames[0] if len(frames) == 1 else {"batch": frames})
                continue
            if "error" in ev:  # the pipeline could not take it (e.g. retired stage): try another
                if req["placed"] < MAX_ATTEMPTS:
                    if (end := await resume()) is not None:
                        return end
                    continue
                return error_frame(ErrorCode.FAILED, str(ev["error"]))
            # the done holds all of the attempt's tokens: those whose events were lost last go out before it
            frames = [self._push(t, tokens, req["stream"], detok) for t in ev["tokens"][len(tokens):]]
            if req["stream"] and frames:
                await emit(frames[0] if len(frames) == 1 else {"batch": frames})
            stages = placement["stages"]
            return {"done": {
                "request_id": req["rid"], "prompt_tokens": ev["prompt_tokens"], "tokens": ev["tokens"],
                "text": ev["text"], "finish_reason": ev["finish_reason"],
                "layout": {"hetero_config": [s["tp"] for s in stages],
                           "pp_partition": [s["layers"][1] - s["layers"][0] for s in stages]},
                "replica": placement["replica"], "epoch": placement["epoch"], "stages": stages,
                "attempts": attempt, "timings": ev["timings"],
            }}
        self._cancel_placement(req["rid"], placement)
        return error_frame(ErrorCode.TIMEOUT, f"request {req['rid']} did not finish within "
                                              f"{req.get('deadline_s', REQUEST_TIMEOUT_S):g} s")

    @staticmethod
    def _take_tokens(ev: dict, receive, tokens: list[int], streamed: bool, detok,
                     stage0: str) -> tuple[list[dict], dict | None]:
        """ev and the token events of the same attempt queued behind it: appended to tokens (each index
        once), as token frames when streaming (with their text if detok); returns them and the first
        message read that is not the next token (another message, or a token ahead of the next one: the
        relay's to handle), if any."""
        frames = []
        while True:
            if int(ev["index"]) == len(tokens):  # else already delivered (a resumed pipeline repeats nothing)
                frame = SubmitService._push(int(ev["token"]), tokens, streamed, detok)
                if streamed:
                    frames.append(frame)
            try:
                nxt = receive.receive_nowait()
            except trio.WouldBlock:
                return frames, None
            if not (nxt.get("kind") == "event" and nxt.get("attempt") == ev["attempt"] and nxt.get("_sender") == stage0
                    and int(nxt["index"]) <= len(tokens)):
                return frames, nxt
            ev = nxt

    @staticmethod
    def _events_lost(ev: dict, tokens: list[int]) -> str | None:
        """Why the current attempt's `ev` shows that some of its token events never came, or None.  A pipe link
        that breaks loses the frames written to it just before, and the next go over a new link (serve/pipe.py):
        a token ahead of the next one, or a done whose tokens do not continue those relayed.  The attempt's
        later tokens could not be streamed in order; the request goes on from the tokens the client has."""
        if ev.get("kind") == "event" and int(ev["index"]) > len(tokens):
            return f"lost token events (token {ev['index']} came next)"
        if ev.get("kind") == "done" and "error" not in ev and ev["tokens"][:len(tokens)] != tokens:
            return "lost token events (its done does not continue the tokens relayed)"
        return None

    @staticmethod
    def _push(token: int, tokens: list[int], streamed: bool, detok) -> dict | None:
        """Append the next token; its frame (with its text if detok) when streaming."""
        tokens.append(token)
        if not streamed:
            return None
        frame = {"token": token, "index": len(tokens) - 1}
        if detok is not None:
            frame["text"] = detok.push(token)
        return frame

    async def _resume(self, req: dict, tokens: list[int], deadline: float, emit) -> dict:
        """Place an accepted request again, from its tokens so far.  It was accepted, so it is
        not given up (nor refused as busy) while the swarm re-forms a layout: retried until the
        request's deadline, with a `waiting` frame per try so its client does not give up on it."""
        req["resume_tokens"] = list(tokens)
        req["resumed"] = True
        why = "resuming"
        while True:
            await emit({"waiting": {"request_id": req["rid"], "tokens": len(tokens), "reason": why}})
            try:  # on `req` itself, not a copy: each try takes a newer attempt number (stage 0 refuses a repeat)
                return await self.place(req)
            except RemoteError as e:
                if trio.current_time() >= deadline:  # a deadline, not a refusal: said as such
                    return error_frame(ErrorCode.TIMEOUT,
                                       f"request {req['rid']} was not placed again within "
                                       f"{req.get('deadline_s', REQUEST_TIMEOUT_S):g} s: {e.message}")
                log.info("request %s waits for a pipeline to resume on: %s", req["rid"], e.message)
                why = e.message
                await trio.sleep(1.0)

    def _cancel_placement(self, rid: str, placement: dict) -> None:
        stage0 = placement["stages"][0]["peer"]
        self.port.send(stage0, {"kind": "cancel", "to": [placement["epoch"], placement["replica"], 0],
                                       "rid": self.wire_id(rid), "attempt": placement["attempt"]})

    def _cancel(self, ev: dict, sender: str | None) -> None:
        if sender and "to_stage0" in ev:
            self.port.send(sender, {"kind": "cancel", "to": ev["to_stage0"], "rid": ev["rid"],
                                           "attempt": ev.get("attempt")})


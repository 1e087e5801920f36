"""Serving on a node: layout negotiation, the rotating head, dispatch, and the pipe routing.

- Head: for each term (`term_s` of wall clock) the head is the first of the live
  head-capable serving peers by rendezvous hash of (term, PeerID); everyone computes
  the same from the same table, and a head that goes silent is skipped as soon as it
  is marked down.  Only the head proposes layouts and dispatches.
- Layout: the head plans from the live view and gossips a signed proposal for a new
  epoch; assigned peers load their stages and report ready; the head gossips a
  signed commit.  The previous epoch keeps serving its requests until they finish
  (make-before-break).  The head re-gossips the commit so late joiners learn it.
- Requests: an entry node (any node) tokenizes, asks the head to place the request;
  the head picks the replica with the earliest predicted finish and sends "start"
  to that replica's stage 0 over the pipe; tokens flow back to the entry node.
"""

from __future__ import annotations

import logging
from functools import partial
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import trio

from hexswarm.errors import ProtocolError, UserError
from hexswarm.model.config import LlamaConfig
from hexswarm.model.source import model_fingerprint
from hexswarm.net.error_codes import ErrorCode
from hexswarm.net.protocols import DEFAULT_MAX_CONCURRENT, DISPATCH, LAYOUT, STATUS, TRACE, RemoteError, RequestError
from hexswarm.net.signed import open_sealed, seal
from hexswarm.runtime.tokenizer import TextTokenizer
from hexswarm.serve import backlog
from hexswarm.serve.layout import SwarmLayout, head_for, rendezvous_rank
from hexswarm.serve.messages import (CancelRequest, ForwardStep, LinkBrokenNotice, NoStageHere, PipelineDecoder,
                                     RequestDone, SampledTokens, StageAddress, StartRequest, TokenEvents,
                                     decode_dispatch, read_layout_request, read_trace_request)
from hexswarm.serve.pipe import MessagePipe
from hexswarm.serve.placement import PipeDispatch
from hexswarm.serve.planning import PeerView, make_layout
from hexswarm.serve.stages import ServeSettings, StageSet
from hexswarm.swarm.peer_table import PeerState

log = logging.getLogger("hexswarm.serving")

LAYOUT_DOMAIN = b"hexswarm/layout/2\x00"  # /2: a layout carries the term of its head
PENDING_PER_SLOT = 4  # the head queues at most this many requests per KV slot of a pipeline
PROPOSAL_GRACE_S = 5.0  # how long a peer a proposal assigns may look down before the proposal is dropped
REPROPOSE_S = 5.0  # a proposal is published again this often until every assigned peer is ready
DISPATCH_RECHECK_S = 0.5  # a placement waiting for a live pipeline looks again this often
READY_ATTEMPTS = 20  # ~80 s of retries with the back-off below
START_HISTORY = 65536  # (entry, request id) pairs whose newest attempt stage 0 remembers
# A peer ranked above a layout's head for its term is taken to have been skipped by that head (down in the
# head's view) when it has been silent this share of down_after_s here, or came up less than JOIN_GRACE_S ago:
# views lag one another by a heartbeat or two around a failover, and a strict check refused the new head.
SKIPPED_SILENCE_SHARE = 0.5
JOIN_GRACE_S = 10.0


def read_layout_message(msg: Any, n_layers: int, model_id: str) -> tuple[str, SwarmLayout]:
    """("propose" | "commit", layout) from a sealed layout message; ProtocolError when it is not
    signed by the layout's own head, altered, malformed, or for another model."""
    obj, signer = open_sealed(msg, LAYOUT_DOMAIN)
    if not isinstance(obj, dict) or obj.get("type") not in ("propose", "commit") or "layout" not in obj:
        raise ProtocolError("layout message of unknown type, or without a layout")
    layout = SwarmLayout.from_wire(obj["layout"], n_layers)
    if signer != layout.head:
        raise ProtocolError(f"layout signed by {signer}, not by its head {layout.head}")
    if layout.model != model_id:
        raise ProtocolError("layout for another model")
    return obj["type"], layout


@dataclass(frozen=True)
class HeadSettings:
    term_s: float = 300.0
    settle_s: float = 1.0  # a view must hold this long before a new layout is proposed
    ready_timeout_s: float = 120.0
    republish_s: float = 2.0
    dispatch_wait_s: float = 30.0  # how long a request waits for a serving pipeline
    serve_layout: dict | None = None
    plan_seed: int = 0


# The stage engines' threads and the trio thread share the GIL.  A thread that waits for it gets
# it only when the holder drops it, at the latest after the switch interval (5 ms by default): as
# long as a whole decode step.  0.5 ms bounds what the network side can add to a step.
GIL_SWITCH_INTERVAL_S = 0.0005


class Server:
    def __init__(self, node, settings: ServeSettings, head: HeadSettings, weights=None):
        import sys

        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.node = node
        self.me = node.peer_id_str
        self.settings = settings
        self.head_settings = head
        self.cfg = LlamaConfig.from_dir(settings.model_dir)
        self.tokenizer = TextTokenizer(settings.model_dir, self.cfg)
        self.model_id = model_fingerprint(settings.model_dir)
        self.pipe = MessagePipe(node, on_send_failed=self._on_send_failed, direct=node.config.direct_data_path,
                                idle_close_s=node.config.pipe_idle_s,
                                on_link_broken=lambda peer: self.stages.link_broken(peer))
        self.stages = StageSet(self.me, self.cfg, self.tokenizer, settings, self.pipe, weights)
        self.pipe.decode = PipelineDecoder(self.cfg, settings.max_seq_len, self.stages.stage_facts).decode
        self.committed: SwarmLayout | None = None
        self._commit_msg: dict | None = None  # the sealed commit, re-gossiped as it is
        self.highest_epoch = 0
        # head: epoch -> (its proposal, the assigned peers that reported ready); only while proposing
        self._ready: dict[int, tuple[SwarmLayout, set[str]]] = {}
        self._reporting: set[int] = set()  # epochs this peer is loading and reporting ready for
        self._proposing = False
        self._last_proposal: SwarmLayout | None = None  # its stages may be loaded though it never committed
        self._view_seen: tuple[frozenset, float] | None = None
        self._last_republish = 0.0
        self._layout_changed = trio.Event()
        # head: when it sent requests to each (epoch, replica), for those not yet in the stage-0 load reports
        self.recent_dispatch: dict[tuple[int, int], list[float]] = {}
        self.entries: dict[str, trio.MemorySendChannel] = {}  # entry: rid -> events channel
        # stage 0: (entry, rid) -> the newest attempt started here, the oldest forgotten first
        self._start_attempts: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._nursery: trio.Nursery | None = None
        self.service_rate = backlog.ServiceRate()  # tokens/s of the stage 0s here, in the records (backlog.py)
        self.placement = PipeDispatch(self)  # dispatch/placed frames over the pipe (placement.py)
        node.extra.update({"model": self.model_id, "serve": True})
        from hexswarm.serve.submit import EntryPort, SubmitService

        self.submit_service = SubmitService(EntryPort(
            me=self.me, node=node, cfg=self.cfg, tokenizer=self.tokenizer,
            max_seq_len=min(self.cfg.max_position_embeddings, self.settings.max_seq_len),
            dispatch_wait_s=self.head_settings.dispatch_wait_s, entries=self.entries, head_order=self.head_order,
            dispatch=self.dispatch, ask_head=self.placement.ask, send=self.pipe.send, local_spans=self.stages.spans,
            tokens_out=lambda: self.stages.tokens_out, committed=lambda: self.committed,
            failed_replicas=self.failed_replicas, refusal=partial(backlog.refusal, self)))

    # ---- lifecycle -----------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.pipe.run)
            # each decoded message straight to its consumer (serve/messages.py lists them)
            self.pipe.on(StartRequest, self._start_here)
            for step_or_notice in (ForwardStep, SampledTokens, CancelRequest, LinkBrokenNotice, NoStageHere):
                self.pipe.on(step_or_notice, self.stages.route)
            self.pipe.on(TokenEvents, self._events_to_entry)
            self.pipe.on(RequestDone, self._done_to_entry)
            self.placement.register(self.pipe, nursery)
            # an entry waits on many placements at once (up to its max_queue): no per-peer share here
            self.node.register_handler(DISPATCH, self._on_dispatch, max_per_peer=DEFAULT_MAX_CONCURRENT)
            self.node.register_handler(LAYOUT, self._on_layout_request)
            self.node.register_handler(STATUS, self._on_status, access="clients")
            # traces name every stage's peer and timings: in an owned swarm a client reads only its own
            self.node.register_handler(TRACE, self._on_trace, access="clients")
            self.submit_service.register()
            await self.node.subscribe(self.node.topic("layout"), self._on_layout_gossip)
            nursery.start_soon(self._head_loop, nursery)
            nursery.start_soon(self._retire_loop)
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await self.stages.close()

    # ---- the head --------------------------------------------------------------------------
    def serving_view(self, any_state: bool = False) -> list[str]:
        """Live peers serving our model, self included, sorted (any_state: the table's down peers too)."""
        peers = {self.me}
        for entry in (self.node.table.entries() if any_state else self.node.table.up()):
            if entry.record.extra.get("model") == self.model_id and entry.record.extra.get("serve"):
                peers.add(entry.peer_id)
        return sorted(peers)

    def head_candidates(self, view: list[str]) -> list[str]:
        heads = [p for p in view if "head" in self._roles(p)]
        return heads or view

    def _roles(self, peer: str) -> list[str]:
        if peer == self.me:
            return list(self.node.config.roles)
        entry = self.node.table.get(peer)
        return list(entry.record.roles) if entry else []

    @property
    def term(self) -> int:
        return int(time.time() // self.head_settings.term_s)

    def current_head(self, view: list[str] | None = None) -> str | None:
        return head_for(self.head_candidates(view or self.serving_view()), self.term)

    def head_order(self) -> list[str]:
        return rendezvous_rank(self.head_candidates(self.serving_view()), self.term)

    async def _head_loop(self, nursery: trio.Nursery) -> None:
        while True:
            await trio.sleep(0.25)
            view = self.serving_view()
            if self.current_head(view) != self.me:
                self._view_seen = None
                continue
            key = frozenset(view)
            now = time.monotonic()
            if self._view_seen is None or self._view_seen[0] != key:
                self._view_seen = (key, now)
            failed = self.committed is not None and bool(self.failed_replicas(self.committed))
            stale = self.committed is None or frozenset(self.committed.view) != key or failed
            # a view that lost a peer holds PROPOSAL_GRACE_S first: on a loaded host peers missed heartbeats for
            # a second all the time, and each miss planned their replicas out (to be loaded again a moment later);
            # meanwhile requests go to the committed layout's healthy replicas
            lost = self.committed is not None and not failed and not key >= frozenset(self.committed.view)
            hold = max(self.head_settings.settle_s, PROPOSAL_GRACE_S) if lost else self.head_settings.settle_s
            if stale and not self._proposing and now - self._view_seen[1] >= hold:
                self._proposing = True
                nursery.start_soon(self._propose, view)
            if self._commit_msg is not None and now - self._last_republish >= self.head_settings.republish_s:
                self._last_republish = now
                await self._publish_layout(self._commit_msg)

    def _peer_views(self, view: list[str]) -> list[PeerView]:
        out = []
        for p in view:
            if p == self.me:
                out.append(PeerView(p, [d.to_wire() for d in self.node.devices], {}, dict(self.node.calibration)))
            else:
                rec = self.node.table.get(p).record
                out.append(PeerView(p, list(rec.devices), dict(rec.links), dict(rec.calibration)))
        return out

    async def _propose(self, view: list[str]) -> None:
        try:
            # replicas whose stages are loaded: the committed layout's healthy ones, and those of the last
            # proposal that every peer loaded (it may have failed to commit only for another replica)
            sources = [x for x in (self.committed, self._last_proposal) if x is not None]
            keep = [list(src.replicas[r]) for src in sources for r in self.healthy_replicas(src)
                    if src is self.committed or self._loaded(src, r)]
            replicas, predicted = await trio.to_thread.run_sync(
                make_layout, self.cfg, self._peer_views(view), self.head_settings.serve_layout,
                self.head_settings.plan_seed, keep)
            await self._learn_highest_epoch(view)
            epoch = self.highest_epoch + 1
            self.highest_epoch = epoch
            replicas = tuple(tuple(r) for r in replicas)
            layout = SwarmLayout(epoch, self.me, self.model_id, tuple(view), replicas, predicted,
                                 self._continuations(sources, replicas), term=self.term)
            self._last_proposal = layout
            log.info("head: proposing epoch %d: %s", epoch, layout.describe())
            self._ready[epoch] = (layout, set())
            ready = self._ready[epoch][1]
            proposal = seal({"type": "propose", "layout": layout.to_wire()}, self.node.identity, LAYOUT_DOMAIN)
            await self._publish_layout(proposal)
            await self._on_layout_gossip(proposal, self.me)
            with trio.move_on_after(self.head_settings.ready_timeout_s):
                published = trio.current_time()
                down_since: dict[str, float] = {}
                while not layout.peers <= ready:
                    # only a peer it assigns staying down spoils a proposal; one that came (back) up is planned
                    # in after this commit, and one missing a heartbeat or two on a busy host may still report
                    # ready (under faults every few seconds, re-planning on every change of the view never
                    # committed a layout, and every request waited for one)
                    now, up = trio.current_time(), set(self.serving_view())
                    down_since = {p: down_since.get(p, now) for p in layout.peers - up}
                    gone = sorted(p for p, t in down_since.items() if now - t > PROPOSAL_GRACE_S)
                    if gone:
                        log.info("head: %s down while epoch %d was loading; re-planning", gone, epoch)
                        return
                    if self.highest_epoch > epoch:
                        # a head that (re)started and could not ask its view for the newest epoch proposed one the
                        # others had passed: they ignore it, and it waited ready_timeout_s (120 s) for nothing
                        log.info("head: epoch %d is already taken (seen %d); re-planning", epoch, self.highest_epoch)
                        return
                    if trio.current_time() - published > REPROPOSE_S:
                        # a peer whose gossip mesh formed after the first publish (e.g. one reached only
                        # through a relay) never saw it; loading peers take a repeat as a no-op
                        await self._publish_layout(proposal)
                        published = trio.current_time()
                    await trio.sleep(0.1)
            if not layout.peers <= ready:
                log.warning("head: epoch %d not ready in time (missing %s)", epoch, sorted(layout.peers - ready))
                return
            commit = seal({"type": "commit", "layout": layout.to_wire()}, self.node.identity, LAYOUT_DOMAIN)
            await self._on_layout_gossip(commit, self.me)
            await self._publish_layout(commit)
            log.info("head: committed epoch %d", epoch)
        except UserError as e:
            log.warning("head: cannot plan a layout: %s", e)
            await trio.sleep(2.0)
        finally:
            self._ready.clear()  # one proposal at a time: nothing else is waited on
            self._proposing = False

    def _continuations(self, sources: list[SwarmLayout], replicas: tuple) -> tuple:
        """For each new replica, a replica of `sources` (the committed layout, then the last proposal) it
        repeats stage for stage, when every stage of that one is loaded and healthy as its peer reports: its
        peers serve on with the stages they have (no load, no wait for ready) instead of loading them again."""
        out: list[tuple[int, int] | None] = []
        for stages in replicas:
            old = next(((src.epoch, r) for src in sources for r in self.healthy_replicas(src)
                        if src.replicas[r] == stages and self._loaded(src, r) and (src.epoch, r) not in out), None)
            out.append(old)
        return tuple(out) if any(c is not None for c in out) else ()

    def _loaded(self, layout: SwarmLayout, replica: int) -> bool:
        return all(self._serves(st.peer, f"{layout.epoch}:{replica}:{si}")
                   for si, st in enumerate(layout.replicas[replica]))

    def _serves(self, peer: str, key: str) -> bool:
        """Whether `peer` has the stage "epoch:replica:stage" loaded, as its last record (or this node) says."""
        if peer == self.me:
            return key in self.stages.slot_counts()
        entry = self.node.table.get(peer)
        return entry is not None and key in (entry.record.extra.get("slots") or {})

    async def _learn_highest_epoch(self, view: list[str]) -> None:
        """A head that just (re)started has seen no commit yet: ask the view for the newest epoch,
        or its proposal would carry an epoch the others already passed, and be ignored."""
        async def ask(peer: str) -> None:
            try:
                reply = await self.node.request(peer, LAYOUT, {"get": True}, timeout=2.0)
                self.highest_epoch = max(self.highest_epoch, int(reply.get("highest", 0)))
            except (RequestError, TypeError, ValueError):
                pass

        async with trio.open_nursery() as nursery:
            for peer in view:
                if peer != self.me:
                    nursery.start_soon(ask, peer)

    async def _publish_layout(self, msg: dict) -> None:
        try:
            await self.node.publish(self.node.topic("layout"), msg)
        except Exception as e:
            log.debug("publishing layout: %s", e)

    # ---- layout messages (every node) ------------------------------------------------------
    async def _on_layout_gossip(self, msg: Any, publisher: str) -> None:
        kind, layout = read_layout_message(msg, self.cfg.num_hidden_layers, self.model_id)
        self.check_layout_head(layout, kind, publisher)
        self.highest_epoch = max(self.highest_epoch, layout.epoch)
        if kind == "propose":
            if self.committed is None or layout.epoch > self.committed.epoch:
                if layout.stages_of(self.me) and layout.epoch not in self._reporting:  # the head repeats proposals
                    self._reporting.add(layout.epoch)
                    self._nursery.start_soon(self._load_and_report, layout)
            return
        if self.committed is None or layout.epoch > self.committed.epoch:
            self.committed = layout
            self._commit_msg = msg
            self._layout_changed.set()
            self._layout_changed = trio.Event()
            log.info("epoch %d committed by %s: %s", layout.epoch, layout.head, layout.describe())
            if layout.stages_of(self.me):
                self._nursery.start_soon(self.stages.load_epoch, layout)

    def check_layout_head(self, layout: SwarmLayout, kind: str = "commit", publisher: str | None = None) -> None:
        """ProtocolError unless the layout's head (its verified signer) led the layout's term: admitted as a
        node, a live head candidate, the term recent (made at most a term and a ready timeout ago, at most a
        term ahead for clock skew), and first for that term among the candidates that may lead here (see
        may_lead: a grace for views that lag).  A commit of an older term is taken when the head of this term
        publishes it: each head re-gossips the commit it serves, for peers that join later."""
        if not self.node.is_allowed(layout.head):
            raise ProtocolError(f"layout from {layout.head}, which is not admitted")
        if layout.head not in self.head_candidates(self.serving_view()):
            raise ProtocolError(f"layout from {layout.head}, which is not a live head candidate")
        if layout.head == self.me:
            return  # our own (the check ran when we made it)
        if self.led_term(layout.head, layout.term):
            return
        if kind == "commit" and publisher is not None and self.led_term(publisher, self.term):
            return
        raise ProtocolError(f"layout from {layout.head}, which is not the head of term {layout.term} here")

    def led_term(self, peer: str, term: int) -> bool:
        """Whether `peer` may have been the head of `term`: the term recent, and every head candidate ranked above
        it for that term one it may have skipped (not may_lead)."""
        s = self.head_settings
        now = time.time()
        if not (now - s.term_s - s.ready_timeout_s) // s.term_s <= term <= self.term + 1:
            return False
        for candidate in rendezvous_rank(self.head_candidates(self.serving_view(any_state=True)), term):
            if candidate == peer:
                return True
            if self.may_lead(candidate):
                return False
        return False

    def may_lead(self, peer: str) -> bool:
        """Whether any view may have `peer` as a live head candidate: ourselves, or a peer up here that was heard
        recently and did not (re)join just now (a head whose view had not seen it yet skipped it rightly)."""
        if peer == self.me:
            return True
        table = self.node.table
        entry = table.get(peer)
        if entry is None or entry.state != PeerState.UP:
            return False
        silent = table.seconds_since_seen(entry) > SKIPPED_SILENCE_SHARE * table.down_after_s * table.scale
        return not silent and table.seconds_up(entry) >= JOIN_GRACE_S

    async def _load_and_report(self, layout: SwarmLayout) -> None:
        try:
            await self._load_and_report_once(layout)
        finally:
            self._reporting.discard(layout.epoch)

    async def _load_and_report_once(self, layout: SwarmLayout) -> None:
        try:
            if not await self.stages.load_epoch(layout, superseded=lambda: self.highest_epoch > layout.epoch):
                return  # superseded before it was loaded: no ready for it
        except Exception as e:
            log.error("epoch %d: cannot load my stages: %s: %s", layout.epoch, type(e).__name__, e)
            return
        # a peer behind a NAT may be reachable only once a relayed connection is up (seconds): keep
        # trying for most of the head's ready timeout
        for attempt in range(READY_ATTEMPTS):
            try:
                if layout.head == self.me:
                    try:
                        self.mark_ready(layout.epoch, self.me)
                    except ProtocolError as e:  # the proposal was dropped while we loaded
                        log.debug("epoch %d: %s", layout.epoch, e)
                else:
                    await self.node.request(layout.head, LAYOUT, {"ready": layout.epoch})
                return
            except RequestError as e:
                log.debug("ready for epoch %d not delivered: %s", layout.epoch, e)
                await trio.sleep(min(0.5 * (attempt + 1), 5.0))

    async def _on_layout_request(self, msg: Any, remote: Any) -> dict:
        epoch = read_layout_request(msg)
        if epoch is not None:
            self.mark_ready(epoch, str(remote))
            return {}
        return {"layout": None if self.committed is None else self.committed.to_wire(), "highest": self.highest_epoch}

    def mark_ready(self, epoch: int, peer: str) -> None:
        """Count `peer` ready for `epoch`: only for the proposal this head waits on, and only from a
        peer it assigns (anything else would grow _ready without bound or commit a layout early)."""
        pending = self._ready.get(epoch)
        if pending is None:
            raise ProtocolError(f"no proposal of epoch {epoch} is waiting for ready reports")
        layout, ready = pending
        if peer not in layout.peers:
            raise ProtocolError(f"epoch {epoch} assigns no stage to {peer}")
        ready.add(peer)

    async def _retire_loop(self) -> None:
        while True:
            await trio.sleep(0.25)
            # every record this node gossips carries its stage-0 loads (the head's queue view)
            self.node.extra["load"] = self.stages.loads()
            self.node.extra["slots"] = self.stages.slot_counts()
            self.node.extra["kv"] = self.stages.kv_counts()
            self.node.extra["failed"] = self.failed_here()
            backlog.publish(self)
            self._set_admit_limits()
            if self.committed is not None:
                await self.stages.retire_older_than(self.committed.epoch)

    def failed_here(self) -> list[str]:
        """"epoch:replica:stage" of this node's stages that stopped, or whose TP follower exited while the
        stage sat idle (the engine only meets a dead follower at its next op; the record should say so now)."""
        idle_dead = {f"{e}:{r}:{s}" for (e, r, s), w in list(self.stages.workers.items())
                     if not getattr(getattr(w, "host", None), "followers_alive", lambda: True)()}
        return sorted(set(self.stages.failed()) | idle_dead)

    def replica_slots(self, layout: SwarmLayout, replica: int, what: str = "slots") -> int | None:
        """The smallest KV slot count ("slots") or KV block count ("kv") over a replica's stages (from
        this node's stages and the peers' records); None while a stage's count is unknown."""
        counts = []
        mine = self.stages.slot_counts() if what == "slots" else self.stages.kv_counts()
        for si, st in enumerate(layout.replicas[replica]):
            key = f"{layout.epoch}:{replica}:{si}"
            if st.peer == self.me:
                counts.append(mine.get(key))
            else:
                entry = self.node.table.get(st.peer)
                counts.append((entry.record.extra.get(what) or {}).get(key) if entry else None)
        if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in counts):
            return None
        return min(counts)

    def _set_admit_limits(self) -> None:
        for (e, r, s), worker in list(self.stages.workers.items()):
            layout = self.stages.layouts.get(e)
            if s != 0 or layout is None:
                continue
            known = self.replica_slots(layout, r)
            # fixed max_batch: every stage has the same count; "auto": wait for the others' counts
            fallback = worker.spec.max_batch if self.settings.max_batch else 1
            worker.admit_limit = known if known is not None else fallback
            # a stage with a smaller cache than stage 0's (memory-capped sizes differ by GPU) caps what
            # stage 0 promises; until its size is known, stage 0's own
            kv = self.replica_slots(layout, r, "kv")
            if kv is not None:
                worker.kv_limit = kv

    # ---- dispatch (head side) --------------------------------------------------------------
    def healthy_replicas(self, layout: SwarmLayout) -> list[int]:
        up = set(self.serving_view())
        failed = self.failed_replicas(layout)
        # loaded as each peer's record says: a peer restarted since the commit loads its stages again first (its
        # starts were refused "not served", 24 in a 2-minute chaos run, each costing its request a placement)
        return [i for i, r in enumerate(layout.replicas)
                if all(s.peer in up for s in r) and i not in failed and self._loaded(layout, i)]

    def failed_replicas(self, layout: SwarmLayout) -> set[int]:
        """Replicas of `layout` with a stage whose engine stopped, as its peer reports (or this node knows)."""
        out = set()
        for ri, replica in enumerate(layout.replicas):
            for si, st in enumerate(replica):
                key = f"{layout.epoch}:{ri}:{si}"
                if st.peer == self.me:
                    reported = self.failed_here()
                else:
                    entry = self.node.table.get(st.peer)
                    reported = entry.record.extra.get("failed") if entry else None
                if isinstance(reported, list) and key in reported:
                    out.add(ri)
        return out

    async def _on_dispatch(self, msg: Any, remote: Any) -> dict:
        return await self.dispatch(decode_dispatch(msg, str(remote), self.cfg, self.settings.max_seq_len).to_dict())

    async def dispatch(self, msg: dict) -> dict:
        """Place one request (head only); returns where it went."""
        head = self.current_head()
        if head != self.me:
            raise RemoteError(ErrorCode.NOT_HEAD, head or "")
        with trio.move_on_after(self.head_settings.dispatch_wait_s):
            while True:
                layout = self.committed
                replicas = self.healthy_replicas(layout) if layout else []
                if replicas:
                    break
                # a new commit, or a peer back up (a missed heartbeat or two on a busy host): look again
                with trio.move_on_after(DISPATCH_RECHECK_S):
                    await self._layout_changed.wait()
        if not replicas:
            what = "no committed layout" if layout is None else f"no live pipeline in epoch {layout.epoch}"
            raise RemoteError(ErrorCode.NO_LAYOUT,
                              f"{what} after {self.head_settings.dispatch_wait_s:g} s; retry later")
        # earliest predicted finish: queue length times the replica's per-request time
        per_request = layout.predicted.get("replica_latency_s") or [1.0] * len(layout.replicas)
        cap = {r: PENDING_PER_SLOT * (self.replica_slots(layout, r) or self.settings.max_batch or 8) for r in replicas}
        load = {r: self.replica_load(layout, r) for r in replicas}
        # already accepted (a later attempt, or a client's failover from another entry): never refused for load
        resuming = int(msg.get("attempt", 1)) > 1 or msg.get("resumed") is True
        if not resuming and all(load[r] >= cap[r] for r in replicas):
            eta = min(per_request[r] for r in replicas) * PENDING_PER_SLOT
            raise RemoteError(ErrorCode.BUSY, f"busy: every pipeline has {min(cap.values())} requests queued; "
                                              f"retry after {max(1.0, eta):.0f} s")
        replica = min(replicas, key=lambda r: ((load[r] + 1) * per_request[r], r))
        stage0 = layout.replicas[replica][0].peer
        start = {k: msg[k] for k in ("rid", "prompt_ids", "params", "max_new_tokens", "stop", "entry", "attempt")}
        if msg.get("ignore_eos"):  # absent otherwise: a stage of an older version drops no start for it
            start["ignore_eos"] = True
        self.pipe.send(stage0, {"kind": "start", "to": [layout.epoch, replica, 0], **start,
                                "resume_tokens": list(msg.get("resume_tokens") or [])})
        self.recent_dispatch.setdefault((layout.epoch, replica), []).append(time.monotonic())
        return {"epoch": layout.epoch, "replica": replica, "head": self.me, "attempt": msg["attempt"],
                "stages": [s.to_wire() for s in layout.replicas[replica]]}

    def replica_load(self, layout: SwarmLayout, replica: int) -> int:
        """Requests a replica holds: its stage 0's last report, plus what was sent since."""
        stage0 = layout.replicas[replica][0].peer
        key = f"{layout.epoch}:{replica}"
        if stage0 == self.me:
            reported = self.stages.loads().get(key, 0)
            lag = 0.0
        else:
            entry = self.node.table.get(stage0)
            reported = int((entry.record.extra.get("load") or {}).get(key, 0)) if entry else 0
            lag = 2 * self.node.heartbeat_s  # the heartbeat in force (slower in large swarms)
        now = time.monotonic()
        recent = [t for t in self.recent_dispatch.get((layout.epoch, replica), []) if now - t <= lag]
        self.recent_dispatch[(layout.epoch, replica)] = recent
        return reported + len(recent)

    # ---- pipe routing (the consumers of decoded messages that are not a stage's alone) ---------------
    def _start_here(self, start: StartRequest, sender: str) -> None:
        self._check_start(start.entry, start.rid, start.attempt, sender)
        if not self.stages.route(start, sender):
            self.pipe.send(start.entry, {"kind": "done", "rid": start.rid, "attempt": start.attempt,
                                         "error": f"stage {list(start.to)} is not served by {self.me}"})

    def _check_start(self, entry: str, rid: str, attempt: int, sender: str) -> None:
        """A start comes from a head, and each (entry, request id) moves to a newer attempt: a replayed
        attempt would meet the tokens of the one it replaces at stage 0 (seen killing the engine)."""
        # head-capable among the peers in the table, up or not: a head that missed a heartbeat or two here (a
        # busy host) still places requests, and its starts dropped here stalled them 60 s each (chaos run)
        if sender != self.me and sender not in self.head_candidates(self.serving_view(any_state=True)):
            raise ProtocolError(f"start from {sender}, which is not a head candidate")
        key = (entry, rid)
        newest = self._start_attempts.get(key, 0)
        if attempt <= newest:  # also a late start of an ask its entry gave up on (a head that answered late)
            raise ProtocolError(f"start of request {rid} attempt {attempt} is not newer than attempt {newest} "
                                "started here")
        self._start_attempts[key] = attempt
        self._start_attempts.move_to_end(key)
        while len(self._start_attempts) > START_HISTORY:
            self._start_attempts.popitem(last=False)

    def _events_to_entry(self, events: TokenEvents, sender: str) -> None:
        """One stage-0 step's new tokens for requests that entered here: to each request's relay."""
        for event in events.relay_messages(sender):
            self._deliver_to_entry(event)

    def _done_to_entry(self, done: RequestDone, sender: str) -> None:
        self._deliver_to_entry(done.relay_message(sender))

    def _deliver_to_entry(self, msg: dict) -> None:
        channel = self.entries.get(msg["rid"])
        if channel is not None:
            try:
                channel.send_nowait(msg)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _on_send_failed(self, peer: str, msgs: list[dict]) -> None:
        told: set[tuple] = set()  # (rid, attempt) whose entry is told, once however many events failed
        for msg in msgs:
            if msg.get("kind") == "start":
                self._done_to_entry(RequestDone(msg["rid"], msg.get("attempt"), None,
                                                error=f"stage 0 peer {peer} unreachable"), self.me)
            elif msg.get("kind") == "dispatch":  # the head is unreachable: its entry asks again
                self.placement.send_failed(peer, msg)
            elif msg.get("kind") in ("events", "done") and "to_stage0" in msg:
                # the entry is gone: nobody will read these requests' tokens; stop computing them
                for item in msg.get("items") or [msg]:
                    self.stages.route(CancelRequest(StageAddress(*msg["to_stage0"]), item["rid"], item.get("attempt")),
                                      self.me)
                    if msg["kind"] == "events" and (item["rid"], item.get("attempt")) not in told:
                        # ... or only its link broke, and a live entry would wait for these tokens until its stall
                        # timer (up to 240 s): told over a new link, it resumes the request at once.  A done that
                        # fails too only cancels, so a dead entry costs one more try
                        told.add((item["rid"], item.get("attempt")))
                        self.pipe.send(peer, {"kind": "done", "rid": item["rid"], "attempt": item.get("attempt"),
                                              "to_stage0": msg["to_stage0"],
                                              "error": f"token events to the entry {peer[:16]} were lost"})

    # ---- status --------------------------------------------------------------------------------
    async def _on_trace(self, msg: Any, remote: Any) -> dict:
        rid, local = read_trace_request(msg)
        if not self.node.is_allowed(remote) and (local or self.submit_service.submitters.get(rid) != str(remote)):
            raise RemoteError(ErrorCode.FORBIDDEN, "a client reads only the traces of requests it submitted")
        if local:
            return {"spans": self.stages.spans(rid)}
        return await self.submit_service.trace(rid)

    async def _on_status(self, msg: Any, remote: Any) -> dict:
        return self.status()

    def status(self) -> dict:
        view = self.serving_view()
        return {
            "peer": self.me,
            "head": self.current_head(view),
            "term": self.term,
            "view": view,
            "model": self.model_id,
            "layout": None if self.committed is None else self.committed.to_wire(),
            "replicas": [] if self.committed is None else self.committed.describe(),
            "stages": self.stages.describe(),
        }

"""The serving loop of one pipeline stage on one host, in its own thread (torch work
stays off the trio loop), in the manner of vLLM's engine core.

Messages arrive on a thread-safe queue and leave through `send(peer, msg)`.

Stage 0 owns the requests.  While any is active, every step it schedules
- one decode row for each running request whose last token is back, and
- chunks of waiting prompts, up to a token budget per step (chunked prefill: a
  long prompt never stalls the running requests for more than one budget),
runs one forward over all of them (a ragged batch, see `StageModel.forward_rows`),
and either samples the whole batch on the device (one-stage pipeline) or sends one
`forward` message to stage 1.  With several stages, up to `micro_batches` steps are
in flight at once (stage 0 works on step k+1 while stage 1 works on step k).
The last stage samples every row that ends a prompt or decodes, in one batched call,
and returns one `tokens` message per step.  Stage 0 sends one `events` message per
entry node per step (all of that entry's new tokens), and `done` per finished request.

Stages that share one GPU in separate processes hand activations and sampled tokens over on the
GPU (runtime/gpu_handoff.py): no stage waits for the GPU before passing a step on, and stage 0
launches step k+1 on the tokens of step k while they are still on the device, as a one-stage
pipeline does, reading them on the host one step later.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from hexswarm.model.kv_cache import BLOCK, blocks_for
from hexswarm.runtime.gpu_handoff import Handoff
from hexswarm.runtime.local_link import LinkSpec, LocalLinks
from hexswarm.runtime.sampling import SamplingParams, sample_on_device
from hexswarm.runtime.shutdown import STOPPING
from hexswarm.runtime.spans import SpanLog, waited, wire_delay
from hexswarm.runtime.stage_host import StageHost
from hexswarm.runtime.stopping import StopChecker
from hexswarm.runtime.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

Send = Callable[[str, dict], None]
STEP_EXPIRY_S = 60.0  # a step whose tokens never came back (a peer died) stops counting as in flight
GPU_WAIT_S = 30.0  # a step handed over on the GPU that never completes: the stage after it died mid-step


@dataclass
class PipelineRoute:
    """Where this stage's output goes, by peer id."""

    stage_index: int
    n_stages: int
    next_peer: str | None  # None on the last stage
    first_peer: str  # stage 0 of this replica (tokens go there)

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.n_stages - 1


@dataclass(frozen=True)
class EngineSettings:
    max_step_tokens: int = 512  # decode rows + prompt-chunk tokens in one step
    micro_batches: int = 1  # steps in flight at once on a pipeline of several stages
    overlap: bool | None = None  # one-stage pipelines: launch step k+1 before reading step k (None: on CUDA)
    # overlapping, a step with new prompts first waits for the step on the GPU so prompts arriving meanwhile
    # join it (a burst prefills in fewer, fuller steps); off, every step keeps the overlap
    gather_prompts: bool = True


@dataclass
class ActiveRequest:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    stopper: StopChecker
    entry: str
    slot: int
    attempt: int
    tokens: list[int] = field(default_factory=list)
    prefilled: int = 0  # tokens of prompt + resumed tokens already in the KV cache
    prefill_done: bool = False  # the whole prompt (+ resumed tokens) is in; now one row per token
    in_flight: int = 0  # rows of this request in steps whose results have not come back
    pending: int = 0  # of those, rows that sample: tokens drawn on the device, not yet read
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    stage_compute_s: list[float] = field(default_factory=list)
    arrival: dict = field(default_factory=dict)  # the message that made its next row ready (for spans)
    params_wire: dict = field(default_factory=dict)  # params.to_dict(), made once
    kv_blocks: int = 0  # KV blocks promised to it at admission (stage 0)

    @property
    def length(self) -> int:
        """Tokens generated, counting those drawn on the device and not read yet."""
        return len(self.tokens) + self.pending

    def sample_spec(self, step: int) -> dict:
        return {"params": self.params_wire, "step": step, "attempt": self.attempt}


@dataclass
class Row:
    """One row of a step: a request's new tokens.  ids None: the row decodes the token its
    request drew in the previous step, still on the device (see StageEngine._launch)."""

    req: ActiveRequest
    ids: list[int] | None
    start: int
    samples: bool  # ends the prompt or decodes: the last stage samples it
    step: int = 0  # the sampling step of this row's token (when it samples)

    @property
    def n(self) -> int:
        return 1 if self.ids is None else len(self.ids)


@dataclass
class LaunchedStep:
    """A step whose tokens were drawn on the device and are being copied to the host: one of a
    one-stage pipeline, or one the last stage handed back on the GPU (`remote`)."""

    rows: list[Row]
    tokens: torch.Tensor  # on the device: the next step may read them before the host does
    host_tokens: torch.Tensor  # pinned; valid once `ready` has completed
    ready: object  # a CUDA event, or None on the CPU (then host_tokens is already valid)
    t0: float
    arrivals: list[dict]
    queued: list[float]
    remote: bool = False  # drawn by another process: wait with a deadline (it may die mid-step)
    sampled: set = field(default_factory=set)  # id() of the requests with a token in it


@dataclass
class InFlight:
    """A step stage 0 sent down the pipeline and has no tokens of yet."""

    sent: float  # time.monotonic()
    reqs: list[ActiveRequest]  # the request objects, not their ids (see StageEngine._steps)
    rows: list[Row] | None = None  # kept when the tokens will come back on the GPU
    t0: float = 0.0
    arrivals: list[dict] = field(default_factory=list)
    queued: list[float] = field(default_factory=list)


class StageEngine:
    def __init__(self, host: StageHost, route: PipelineRoute, send: Send, tokenizer: TextTokenizer | None = None,
                 name: str = "stage", settings: EngineSettings = EngineSettings(), links: LinkSpec | None = None):
        self.host = host
        self.route = route
        self.send = send
        self.last_message_at = time.monotonic()  # for retiring idle stages (link messages skip the node)
        # forward and tokens messages to stages on this host go straight to their engines (on the
        # GPU when they share it: ring buffers of one step's rows, one per step in flight)
        if links is not None:
            links = dataclasses.replace(links, device=str(host.spec.device_of(0)), capacity=settings.max_step_tokens,
                                        depth=max(1, settings.micro_batches))
        self.links = LocalLinks(links, self.submit) if links is not None else None
        self.tokenizer = tokenizer
        self.settings = settings
        self.inbox: queue.Queue = queue.Queue()
        self.requests: dict[str, ActiveRequest] = {}
        self.waiting: list[dict] = []  # started requests without a free KV slot yet
        self.free_slots = list(range(host.spec.max_batch))
        # KV blocks promised to admitted requests (stage 0): a request is admitted only when its
        # prompt + max_new_tokens fit beside the others', so no step ever finds the pool full
        self.kv_committed = 0
        self._freed: list[int] = []  # slots released since the last step: their blocks go back with it
        # requests admitted at once: the smallest KV slot count of the pipeline's stages (set by
        # the serving layer once it knows them; slots of different stages are sized apart)
        self.admit_limit = host.spec.max_batch
        self.kv_limit = 0  # KV blocks: the smallest cache of the pipeline (serving layer); 0: this stage's own
        self.spans = SpanLog()
        # in flight: id -> (sent, the requests of its rows).  The request objects, not their ids: an id taken
        # back by a newer attempt while an old attempt's step is in flight must not count that step as its own
        self._steps: OrderedDict[int, InFlight] = OrderedDict()
        self._next_step = 0
        # A one-stage pipeline on CUDA launches step k+1 (fed with step k's tokens on the device)
        # before it reads step k's tokens, so the host's bookkeeping overlaps the GPU's work.
        wanted = settings.overlap if settings.overlap is not None else host.spec.device == "cuda"
        self._overlap = route.is_first and route.is_last and wanted
        self._launched: LaunchedStep | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.error: BaseException | None = None
        self._loaded = threading.Event()  # the host is loaded (or failed to: _load_error)
        self._load_error: BaseException | None = None
        self.steps_run = 0
        self.rows_run = 0

    # ---- called from any thread -------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread; it loads the host first if it is not loaded (see wait_loaded)."""
        self._thread.start()

    def wait_loaded(self) -> None:
        """Block until the worker thread has loaded the host; raise what loading raised."""
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    def submit(self, msg: dict) -> None:
        self.last_message_at = time.monotonic()
        self.inbox.put(msg)

    def close(self) -> None:
        self.inbox.put({"kind": "close"})
        self._thread.join(timeout=10)
        if self.links is not None:
            self.links.close()
        self.host.close()

    def _link_key(self, kind: str) -> tuple[int, int, int]:
        e, r, s = self.links.spec.key
        return (e, r, s + 1) if kind == "forward" else (e, r, 0)

    def _on_gpu(self, peer: str, kind: str, field: str, t: torch.Tensor) -> bool:
        """Whether a step message with tensor t would reach that stage without leaving the GPU."""
        return self.links is not None and self.links.gpu_path(peer, self._link_key(kind), field, t)

    def _send_step(self, peer: str, msg: dict) -> None:
        """A forward or tokens message: over the local link when that stage runs on this host."""
        if self.links is not None and self.links.send(peer, self._link_key(msg["kind"]), msg):
            return
        self.send(peer, _on_host(msg))

    @property
    def in_flight(self) -> int:
        return len(self.requests) + len(self.waiting)

    @property
    def spec(self):
        return self.host.spec

    # ---- the worker thread -------------------------------------------------------------
    def _load(self) -> bool:
        """Load the host here unless the caller did: the thread that steps a stage also loads it (CPU
        `generate` with one stage decoded 1.2-1.4x slower on 16 cores when another thread had loaded
        it, BENCHMARKS run 26f; likely two OpenMP thread teams at work instead of one)."""
        try:
            if self.spec.device == "cuda":  # this thread's kernels run on the leader's GPU (Triton: the current one)
                torch.cuda.set_device(self.spec.device_of(0))
            if self.host.executor is None:
                self.host.start()
            return True
        except BaseException as e:  # wait_loaded raises it in the caller
            self._load_error = e
            return False
        finally:
            self._loaded.set()

    def _loop(self) -> None:
        try:
            if not self._load():
                return
            with torch.inference_mode():
                while True:
                    if self.route.is_first:
                        self._admit_waiting()  # requests that waited for a slot or KV blocks freed by the last step
                    msgs = self._drain(block=not self._can_step() and self._launched is None)
                    if any(m.get("kind") == "close" for m in msgs):
                        return
                    if self.route.is_first:
                        events = self._handle_first(msgs)
                        if (self._overlap and self.settings.gather_prompts and self._launched is not None
                                and self._new_prompts()):
                            # a step with new prompts waits for the step on the GPU (~one step of host
                            # work not overlapped): prompts arriving meanwhile join it, and a burst of
                            # requests is prefilled in fewer, fuller steps
                            self._finish_launched()
                            for entry, items in self._handle_first(self._drain(block=False)).items():
                                events.setdefault(entry, []).extend(items)
                        if self._can_step():
                            self._step(events)  # the events go out once the step is launched
                        elif self._launched is not None:
                            self._finish_launched()
                        self._flush_events(events)
                    else:
                        forwards = [m for m in msgs if m.get("kind") == "forward"]
                        if forwards:
                            self._forward_downstream(forwards)
        except BaseException as e:  # report: the serving layer fails the requests over
            if STOPPING.is_set():
                log.info("stage engine %s ended with the process's shutdown: %s: %s", self._thread.name,
                         type(e).__name__, e)
            else:
                log.exception("stage engine %s failed", self._thread.name)
            self.error = e

    def _drain(self, block: bool) -> list[dict]:
        msgs = []
        if block:
            msgs.append(self.inbox.get())
        while True:
            try:
                msgs.append(self.inbox.get_nowait())
            except queue.Empty:
                return msgs

    # ---- stage 0 -----------------------------------------------------------------------
    def _handle_first(self, msgs: list[dict]) -> dict[str, list[dict]]:
        """Take in new requests, returned tokens and cancels; returns the token events to send."""
        events: dict[str, list[dict]] = {}
        for m in msgs:
            kind = m.get("kind")
            try:
                if kind == "start":
                    self._start(m)
                elif kind == "tokens":
                    self._step_returned(m, events)
                elif kind == "cancel":
                    self._cancel(m["rid"], m.get("attempt"), m.get("_sender"))
                elif kind in ("_link_broken", "link_broken"):  # this node's pipe saw it, or a later stage did
                    self._link_broken(m["peer"])
            except Exception as e:  # one bad message is dropped; the engine and its other requests go on
                log.warning("stage engine %s dropped a %s message: %s: %s", self._thread.name, kind,
                            type(e).__name__, e)
                if kind == "start" and isinstance(m.get("entry"), str):
                    self.send(m["entry"], {"kind": "done", "rid": m.get("rid"), "attempt": m.get("attempt"),
                                           "error": f"stage 0 refused the request: {type(e).__name__}"})
        self._admit_waiting()
        return events

    def _admit_waiting(self) -> None:
        while self.waiting and self.free_slots and len(self.requests) < self.admit_limit and self._fits(self.waiting[0]):
            req = self._admit(self.waiting.pop(0))
            if req.tokens and self._finish_if_done(req):
                continue  # resumed after its last token: nothing left to compute

    def _start(self, m: dict) -> None:
        """Queue a new request.  A request is its entry's: the same id from another entry while the first
        is live is refused (it would take over the first's tokens); from the same entry it is a newer
        attempt (a resume that overtook the cancel of the old one), which replaces the old."""
        rid, entry = m["rid"], m["entry"]
        SamplingParams.from_dict(m["params"])  # a malformed request fails here, before it holds a slot
        int(m["max_new_tokens"]), list(m["prompt_ids"])
        live = self.requests.get(rid)
        queued = [w for w in self.waiting if w["rid"] == rid]
        owner = live.entry if live is not None else (queued[0]["entry"] if queued else entry)
        if owner != entry:
            self.send(entry, {"kind": "done", "rid": rid, "attempt": m.get("attempt"),
                              "error": f"request id {rid} is already running from another entry node"})
            return
        attempt = int(m.get("attempt") or 0)
        if live is not None and attempt < live.attempt:
            return  # an older attempt than the one running: stale
        if live is not None:
            self._release(live)
        self.waiting = [w for w in self.waiting if w["rid"] != rid] + [m]

    def _kv_need(self, m: dict) -> int:
        """KV blocks a request can come to hold: its prompt, resumed tokens and new tokens."""
        n = len(m["prompt_ids"]) + int(m["max_new_tokens"])
        return blocks_for(min(n, self.host.spec.max_seq_len))

    def _fits(self, m: dict) -> bool:
        """Whether the first waiting request (`m`) has its blocks free now; those at the front that
        could never fit are refused first (they would hold the queue for ever)."""
        kv = self.host.executor.kv
        limit = min(kv.n_blocks, self.kv_limit or kv.n_blocks)
        need = self._kv_need(m)
        while need > limit:
            self.waiting.pop(0)
            self.send(m["entry"], {"kind": "done", "rid": m["rid"], "attempt": m.get("attempt"),
                                   "error": f"the request needs {need * BLOCK} KV positions; this "
                                            f"pipeline's cache holds {limit * BLOCK} (kv_tokens)"})
            if not self.waiting:
                return False
            m = self.waiting[0]
            need = self._kv_need(m)
        return self.kv_committed + need <= limit

    def _admit(self, m: dict) -> ActiveRequest:
        params = SamplingParams.from_dict(m["params"])
        stopper = StopChecker(self.tokenizer, int(m["max_new_tokens"]), list(m.get("stop") or []),
                              m.get("ignore_eos") is True)
        req = ActiveRequest(m["rid"], list(m["prompt_ids"]), params, stopper, m["entry"], self.free_slots.pop(0),
                            int(m.get("attempt") or 0), tokens=list(m.get("resume_tokens") or []))
        req.arrival = m
        req.params_wire = params.to_dict()
        req.kv_blocks = self._kv_need(m)
        self.kv_committed += req.kv_blocks
        self.requests[req.rid] = req
        return req

    def _schedulable(self, req: ActiveRequest) -> bool:
        """Nothing of it in flight; or exactly one row, whose token is on this device and not yet
        read (the launched step: overlapping, or handed back on the GPU) and is not the request's
        last, so the next row can follow it at once."""
        if req.in_flight == 0:
            return True
        prev = self._launched
        return (prev is not None and req.in_flight == 1 and req.pending == 1 and req.prefill_done
                and req.length < req.stopper.max_new_tokens and id(req) in prev.sampled)

    def _new_prompts(self) -> bool:
        return any(r.prefilled == 0 and r.in_flight == 0 for r in self.requests.values())

    def _can_step(self) -> bool:
        if not self.route.is_first:
            return False
        self._expire_steps()
        if len(self._steps) >= max(1, self.settings.micro_batches):
            return False
        return any(self._schedulable(r) for r in self.requests.values())

    def _expire_steps(self) -> None:
        """A step whose tokens never came back (a peer died, a frame was lost): its requests go back to
        their entries.  Not sent again from here: a lost prefill chunk has already moved `prefilled` on,
        so a re-sent decode row would run on a cache missing that chunk."""
        now = time.monotonic()
        expired: list[ActiveRequest] = []
        while self._steps:
            sid, step = next(iter(self._steps.items()))
            if now - step.sent < STEP_EXPIRY_S:
                break
            del self._steps[sid]
            expired += [req for req in step.reqs if self.requests.get(req.rid) is req]
        if expired:
            self._hand_back(expired, f"no tokens for a step within {STEP_EXPIRY_S:g} s")

    def _schedule(self) -> list[Row]:
        """Decode rows first (each running request whose token is back, or on the device), then
        prompt chunks in arrival order, within the step's token budget."""
        budget = self.settings.max_step_tokens
        ready = [r for r in self.requests.values() if self._schedulable(r)]
        decoding = [r for r in ready if r.prefill_done]
        if self.settings.micro_batches > 1 and self.route.n_stages > 1:
            # split the running requests over the micro-batches, so each step carries its share
            decoding = decoding[: max(1, math.ceil(len(self.requests) / self.settings.micro_batches))]
        rows = [Row(r, None if r.pending else [r.tokens[-1]], len(r.prompt_ids) + r.length - 1, True, r.length)
                for r in decoding[:budget]]
        budget -= len(rows)
        for r in ready:
            if r.prefill_done or budget <= 0:
                continue
            context = r.prompt_ids + r.tokens
            n = min(len(context) - r.prefilled, budget)
            done = r.prefilled + n == len(context)
            rows.append(Row(r, context[r.prefilled:r.prefilled + n], r.prefilled, done, len(r.tokens)))
            budget -= n
        return rows

    def _step(self, events: dict[str, list[dict]]) -> None:
        """Schedule and launch one step; `events` (token events to send) go out while the GPU runs it."""
        rows = self._schedule()
        if not rows:
            return
        arrivals = [r.req.arrival for r in rows]
        queued = [waited(m) for m in arrivals]
        t0 = time.perf_counter()
        freed, self._freed = list(dict.fromkeys(self._freed)), []
        out = self.host.run({"op": "forward", "rows": [[r.req.slot, r.start, r.n] for r in rows],
                             "ids": self._input_ids(rows), "free": freed})
        for r in rows:
            r.req.in_flight += 1
            r.req.pending += r.samples
            r.req.arrival = {}
            if not r.req.prefill_done:
                r.req.prefilled += r.n
                r.req.prefill_done = r.samples
        self._flush_events(events)
        events.clear()
        if self.route.is_last:
            launched = self._sample(rows, out, t0, arrivals, queued)
            previous, self._launched = self._launched, launched
            if previous is not None:
                self._finish(previous)  # overlapped: step k's tokens are read while step k+1 runs
            if not self._overlap:
                self._finish_launched()
            return
        on_gpu = self._on_gpu(self.route.next_peer, "forward", "x", out)
        x = out if on_gpu else out.cpu()
        dt = time.perf_counter() - t0
        if not on_gpu:  # on the GPU path the spans are taken when the tokens are read (_finish)
            self._record_spans(rows, arrivals, queued, dt)
        sid = self._next_step
        self._next_step += 1
        self._steps[sid] = InFlight(time.monotonic(), [r.req for r in rows], rows if on_gpu else None, t0,
                                    arrivals, queued)
        self._send_step(self.route.next_peer, {
            "kind": "forward", "steps": [sid], "rows": [[r.req.slot, r.start, r.n] for r in rows],
            "rids": [r.req.rid for r in rows],
            "samples": [r.req.sample_spec(r.step) if r.samples else None for r in rows],
            "x": x, "t": [dt], "free": freed})
        self._finish_launched()  # tokens handed back on the GPU: read now, while the GPU runs this step

    def _input_ids(self, rows: list[Row]) -> list[int] | torch.Tensor:
        """The step's token ids: a list, or (overlapping) a device tensor where rows decode the
        tokens the previous step drew and the host has not read yet."""
        flat = [t for r in rows for t in (r.ids or [0])]
        from_device = [(i, r.req) for i, r in enumerate(rows) if r.ids is None]
        if not from_device:
            return flat
        prev = self._launched
        index = {id(row.req): j for j, row in enumerate(r for r in prev.rows if r.samples)}
        dev = prev.tokens.device
        host = torch.tensor(flat + [i for i, _ in from_device] + [index[id(req)] for _, req in from_device],
                            dtype=torch.long)
        if dev.type == "cuda":
            host = host.pin_memory()
        host = host.to(dev, non_blocking=True)
        n, k = len(flat), len(from_device)
        ids, where, which = host[:n].clone(), host[n:n + k], host[n + k:]
        # decode rows come first, so a row's place in `flat` is its place among the rows
        return ids.index_copy_(0, where, prev.tokens.index_select(0, which))

    def _sample(self, rows: list[Row], logits: torch.Tensor, t0: float, arrivals, queued) -> LaunchedStep:
        picked = [i for i, r in enumerate(rows) if r.samples]
        if len(picked) != len(rows):
            logits = logits[picked]
        if picked:
            tokens = sample_on_device(logits, [rows[i].req.params for i in picked], [rows[i].step for i in picked])
        else:
            tokens = torch.empty(0, dtype=torch.long, device=logits.device)
        return _reading(rows, tokens, t0, arrivals, queued)

    def _finish_launched(self) -> None:
        launched, self._launched = self._launched, None
        if launched is not None:
            self._finish(launched)

    def _finish(self, step: LaunchedStep) -> None:
        """Read a one-stage step's tokens and hand them to their requests."""
        if step.ready is not None:
            _wait(step.ready, GPU_WAIT_S) if step.remote else step.ready.synchronize()
        tokens = step.host_tokens.tolist()
        dt = time.perf_counter() - step.t0
        self._record_spans(step.rows, step.arrivals, step.queued, dt)
        it = iter(tokens)
        items = [{"rid": r.req.rid, "token": next(it), "attempt": r.req.attempt, "step": r.step}
                 for r in step.rows if r.samples]
        events: dict[str, list[dict]] = {}
        self._tokens_back([r.req for r in step.rows], items, [dt], events)
        self._flush_events(events)

    def _record_spans(self, rows: list[Row], arrivals: list[dict], queued: list[float], dt: float) -> None:
        for r, m, q in zip(rows, arrivals, queued):  # stage 0's inbound hop is the token's return
            self.spans.add(r.req.rid, queue_s=q, compute_s=dt, net_s=wire_delay(m))
        self.steps_run += 1
        self.rows_run += len(rows)

    def _step_returned(self, m: dict, events: dict[str, list[dict]]) -> None:
        if isinstance(m.get("tok"), Handoff):
            self._returned_on_gpu(m, m.pop("tok"))
            return
        _on_host(m)  # a link without a GPU ring sent the tokens as a host tensor: into the items
        reqs: list[ActiveRequest] = []
        for sid in m.get("steps", []):
            entry = self._steps.pop(sid, None)
            if entry is not None:
                reqs += [req for req in entry.reqs if self.requests.get(req.rid) is req]
        for req in reqs:
            req.arrival = m
        self._tokens_back(reqs, m["items"], m.get("t", []), events)

    def _returned_on_gpu(self, m: dict, tok: Handoff) -> None:
        """The last stage drew a step's tokens into its ring: take a copy on this device and launch
        from it; the host reads it after the next step is launched (see _step)."""
        entries = [self._steps.pop(sid, None) for sid in m.get("steps", [])]
        step = entries[0] if len(entries) == 1 else None
        if step is None or step.rows is None:
            log.warning("stage engine %s: GPU tokens for unknown steps %s", self._thread.name, m.get("steps"))
            return
        for req in step.reqs:
            if self.requests.get(req.rid) is req:
                req.arrival = m
        launched = _reading(step.rows, tok.take().clone(), step.t0, step.arrivals, step.queued, remote=True)
        self._finish_launched()
        self._launched = launched

    def _tokens_back(self, reqs: list[ActiveRequest], items: list[dict], stage_times: list[float],
                     events: dict[str, list[dict]]) -> None:
        """A step came back: its rows are no longer in flight, and its sampled tokens go to their
        requests (a request that was finished or cancelled meanwhile is not in `requests`)."""
        for req in reqs:
            req.in_flight = max(0, req.in_flight - 1)
        # first tokens first: the entry relays a step's tokens in this order, and a first token waits for
        # those before it (at 32 streams ~5 ms of the entry's loop, BENCHMARKS run 20f); stable otherwise
        for item in sorted(items, key=lambda item: item.get("step") != 0):
            req = self.requests.get(item["rid"])
            if req is None or item.get("attempt") != req.attempt:
                continue  # a token of a finished request, or of a cancelled attempt
            req.pending = max(0, req.pending - 1)
            if item.get("step") != len(req.tokens):
                continue  # a replay
            self._accept_token(req, int(item["token"]), stage_times, events)

    def _accept_token(self, req: ActiveRequest, token: int, stage_times: list[float],
                      events: dict[str, list[dict]]) -> None:
        now = time.perf_counter()
        if req.first_token_s is None:
            req.first_token_s = now - req.started
        for i, t in enumerate(stage_times):
            while len(req.stage_compute_s) <= i:
                req.stage_compute_s.append(0.0)
            req.stage_compute_s[i] += t
        req.tokens.append(token)
        events.setdefault(req.entry, []).append(
            {"rid": req.rid, "attempt": req.attempt, "index": len(req.tokens) - 1, "token": token})
        if req.stopper.finish_reason(req.tokens) is not None:
            self._flush_events({req.entry: events.pop(req.entry)})  # the tokens go out before `done`
            self._finish_if_done(req)

    def _flush_events(self, events: dict[str, list[dict]]) -> None:
        for entry, items in events.items():
            self.send(entry, {"kind": "events", "items": items})

    def _finish_if_done(self, req: ActiveRequest) -> bool:
        """Send `done` and free the slot when the request has finished; True if it has."""
        reason = req.stopper.finish_reason(req.tokens)
        if reason is None:
            return False
        now = time.perf_counter()
        if req.first_token_s is None:
            req.first_token_s = now - req.started
        self.send(req.entry, {
            "kind": "done", "rid": req.rid, "attempt": req.attempt, "tokens": req.tokens,
            "prompt_tokens": req.prompt_ids, "text": req.stopper.text(req.tokens), "finish_reason": reason,
            "timings": {"ttft_s": round(req.first_token_s, 4), "total_s": round(now - req.started, 4),
                        "stage_compute_s": [round(t, 4) for t in req.stage_compute_s]},
        })
        self._release(req)
        return True

    def _release(self, req: ActiveRequest) -> None:
        # a row of it may still be in flight (a step already launched): that row writes only this
        # slot's cache past what a new owner has written before it reads, and its token is dropped
        del self.requests[req.rid]
        self.free_slots.append(req.slot)
        self.kv_committed -= req.kv_blocks
        self._freed.append(req.slot)

    def _cancel(self, rid: str, attempt: int | None, sender: str | None = None) -> None:
        """Drop a request (only the given attempt of it, when named); only its entry node,
        or this node itself, may cancel it."""
        def may(entry: str) -> bool:
            return sender in (None, entry, self.route.first_peer)

        self.waiting = [m for m in self.waiting
                        if not (m["rid"] == rid and attempt in (None, m.get("attempt")) and may(m["entry"]))]
        req = self.requests.get(rid)
        if req is not None and attempt in (None, req.attempt) and may(req.entry):
            self._release(req)

    def _link_broken(self, peer: str) -> None:
        """A link of this pipeline to or from `peer` broke: the steps in flight may be lost.  Their
        requests end here with an error, and each entry places its request again from the tokens
        it has (exactly once); the pipeline is otherwise whole, so it may well get them back."""
        lost = [req for req in self.requests.values() if req.in_flight]
        # every step in flight held only these requests (a request with nothing in flight is in none)
        self._steps.clear()
        if lost:
            self._hand_back(lost, f"pipeline link to {peer} broke")

    def _hand_back(self, reqs: list[ActiveRequest], why: str) -> None:
        """End requests here with an error: each entry resumes its request from the tokens it has."""
        log.warning("stage engine %s: %s; handing %d requests back to their entries", self._thread.name, why,
                    len(reqs))
        for req in reqs:
            if self.requests.get(req.rid) is not req:
                continue
            self._release(req)
            self.send(req.entry, {"kind": "done", "rid": req.rid, "attempt": req.attempt, "error": why})

    # ---- later stages --------------------------------------------------------------------
    def _finite(self, flags: torch.Tensor, msgs: list[dict]) -> bool:
        """Whether every step of a combined forward had finite activations (read after the step's
        own sync, so it costs no wait); a bad one drops the whole combined step with a log line."""
        ok = flags.tolist()
        for m, good in zip(msgs, ok):
            if not good:
                log.warning("stage engine %s dropped a forward step with non-finite activations from %s",
                            self._thread.name, m.get("_sender"))
        return all(ok)

    def _forward_downstream(self, msgs: list[dict]) -> None:
        """Run every queued step as one (their rows concatenated, decode rows first).  Steps with
        non-finite activations are not passed on (their requests fail over by step expiry); the
        check runs on the device beside the forward and is read once the step's output is.  Steps
        handed over on the GPU come from an engine of this user on this GPU: not checked, and run
        one at a time (stage 0 reads the tokens of each step by its ring slot)."""
        slots = [row[0] for m in msgs for row in m["rows"]]
        if len(msgs) > 1 and (any(isinstance(m["x"], Handoff) for m in msgs) or len(set(slots)) < len(slots)):
            # (a slot twice in one step: a released request's last row beside its successor's first;
            # a step maps each slot to one set of KV blocks)
            for m in msgs:
                self._forward_downstream([m])
            return
        device = self.host.spec.device_of(0)
        checked = [m for m in msgs if not isinstance(m["x"], Handoff)]
        for m in msgs:
            m["x"] = m["x"].take() if isinstance(m["x"], Handoff) else m["x"].to(device, non_blocking=True)
        finite = torch.stack([torch.isfinite(m["x"]).all() for m in checked]) if checked else None
        if len(msgs) == 1:
            m = msgs[0]
            rows, rids, samples, x = m["rows"], m["rids"], m["samples"], m["x"]
        else:
            order = [(mi, ri) for one_token in (True, False) for mi, m in enumerate(msgs)
                     for ri, row in enumerate(m["rows"]) if (row[2] == 1) == one_token]
            rows = [msgs[mi]["rows"][ri] for mi, ri in order]
            rids = [msgs[mi]["rids"][ri] for mi, ri in order]
            samples = [msgs[mi]["samples"][ri] for mi, ri in order]
            x = torch.cat([_row_slice(msgs[mi], ri) for mi, ri in order])
        queued = [waited(m) for m in msgs]
        freed = list(dict.fromkeys(s for m in msgs for s in m.get("free") or ()))
        t0 = time.perf_counter()
        out = self.host.run({"op": "forward", "rows": rows, "x": x, "free": freed})
        stage_times = [max(m["t"][i] for m in msgs) for i in range(min(len(m["t"]) for m in msgs))]
        steps = [sid for m in msgs for sid in m["steps"]]
        if self.route.is_last:
            picked = [i for i, s in enumerate(samples) if s is not None]
            params = [SamplingParams.from_dict(samples[i]["params"]) for i in picked]
            logits = out if len(picked) == len(samples) else out[picked]  # decode steps: every row samples
            tok = (sample_on_device(logits, params, [int(samples[i]["step"]) for i in picked]) if picked
                   else torch.empty(0, dtype=torch.long, device=out.device))
            items = [{"rid": rids[i], "attempt": samples[i].get("attempt"), "step": int(samples[i]["step"])}
                     for i in picked]
            msg = {"kind": "tokens", "steps": steps, "items": items, "tok": tok}
            dest = self.route.first_peer
        else:
            msg = {"kind": "forward", "steps": steps, "rows": rows, "rids": rids, "samples": samples, "x": out,
                   "free": freed}
            dest = self.route.next_peer
        field = "tok" if self.route.is_last else "x"
        if not self._on_gpu(dest, msg["kind"], field, msg[field]):
            msg = _on_host(msg)  # waits for this step: the finiteness flags are ready with it
        if finite is not None and not self._finite(finite, checked):
            return
        dt = time.perf_counter() - t0
        msg["t"] = stage_times + [dt]
        self._send_step(dest, msg)
        for m, q in zip(msgs, queued):
            for rid in m["rids"]:
                self.spans.add(rid, queue_s=q, compute_s=dt, net_s=wire_delay(m))


def _on_host(msg: dict) -> dict:
    """A step message with its tensors on the host: activations copied down, drawn tokens
    written into the items (for the node's path, or a link without a GPU ring)."""
    x = msg.get("x")
    if isinstance(x, torch.Tensor) and x.device.type != "cpu":
        msg["x"] = x.cpu()
    tok = msg.pop("tok", None)
    if tok is not None:
        for item, t in zip(msg["items"], tok.tolist()):
            item["token"] = t
    return msg


def _reading(rows: list[Row], tokens: torch.Tensor, t0: float, arrivals: list[dict], queued: list[float],
             remote: bool = False) -> LaunchedStep:
    """A step whose tokens are on the device: start their copy to the host (read in _finish)."""
    ready = None
    if tokens.is_cuda:
        host_tokens = torch.empty(tokens.shape, dtype=torch.long, pin_memory=True)
        host_tokens.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    else:
        host_tokens = tokens
    return LaunchedStep(rows, tokens, host_tokens, ready, t0, arrivals, queued, remote,
                        {id(r.req) for r in rows if r.samples})


def _wait(event, limit_s: float) -> None:
    """Wait for a CUDA event that depends on another process's GPU work, which may never finish
    if that process died mid-step: the engine then fails (its requests fail over)."""
    end = time.monotonic() + limit_s
    while not event.query():
        if time.monotonic() > end:
            raise RuntimeError(f"a step handed over on the GPU did not finish in {limit_s:g} s")
        time.sleep(50e-6)


def _row_slice(msg: dict, row: int) -> torch.Tensor:
    """The tokens of one row of a forward message's flattened activations."""
    start = sum(r[2] for r in msg["rows"][:row])
    return msg["x"][start:start + msg["rows"][row][2]]

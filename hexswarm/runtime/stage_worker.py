"""The serving loop of one pipeline stage on one host, in its own thread (torch work
stays off the trio loop).

Messages arrive on a thread-safe queue and leave through `send(peer, msg)`:
- stage 0 drives requests: "start" (a new request) and "tokens" (sampled by the
  last stage) come in; it runs prefill / batched decode steps and sends "forward"
  to stage 1, and "event"/"done" messages to each request's entry peer;
- a middle stage turns "forward" into "forward" for the next stage;
- the last stage samples every row and sends "tokens" back to stage 0.
Decode steps of all requests that are ready are batched into one forward pass,
and stages work on different requests at the same time (pipelining).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from hexswarm.runtime.sampling import SamplingParams, sample_token
from hexswarm.runtime.spans import SpanLog, waited, wire_delay
from hexswarm.runtime.stage_host import StageHost
from hexswarm.runtime.stopping import StopChecker
from hexswarm.runtime.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

Send = Callable[[str, dict], None]


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
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    stage_compute_s: list[float] = field(default_factory=list)

    def sample_spec(self) -> dict:
        return {"params": self.params.to_dict(), "step": len(self.tokens), "attempt": self.attempt}


class StageWorker:
    def __init__(self, host: StageHost, route: PipelineRoute, send: Send, tokenizer: TextTokenizer | None = None,
                 name: str = "stage"):
        self.host = host
        self.route = route
        self.send = send
        self.tokenizer = tokenizer
        self.inbox: queue.Queue = queue.Queue()
        self.requests: dict[str, ActiveRequest] = {}
        self.waiting: list[dict] = []  # started requests without a free KV slot yet
        self.free_slots = list(range(host.spec.n_slots))
        self.spans = SpanLog()
        self._arrival: dict[str, dict] = {}  # rid -> the message that made its next step ready
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._closing = False
        self.error: BaseException | None = None

    # ---- called from any thread -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, msg: dict) -> None:
        self.inbox.put(msg)

    def close(self) -> None:
        self.inbox.put({"kind": "close"})
        self._thread.join(timeout=10)
        self.host.close()

    @property
    def in_flight(self) -> int:
        return len(self.requests) + len(self.waiting)

    # ---- the worker thread -------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    batch = [self.inbox.get()]
                    while True:
                        try:
                            batch.append(self.inbox.get_nowait())
                        except queue.Empty:
                            break
                    if any(m.get("kind") == "close" for m in batch):
                        return
                    self._handle(batch)
        except BaseException as e:  # report: the serving layer fails the requests over
            log.exception("stage worker %s failed", self._thread.name)
            self.error = e

    def _handle(self, batch: list[dict]) -> None:
        if not self.route.is_first:
            forwards = [m for m in batch if m.get("kind") == "forward"]
            for group in _compatible_groups(forwards):
                self._forward_downstream(group)
            return
        decode: list[ActiveRequest] = []
        prefill: list[ActiveRequest] = []
        for m in batch:
            kind = m.get("kind")
            if kind == "start":
                self.waiting.append(m)
                self._arrival[m["rid"]] = m
            elif kind == "tokens":
                for item in m["items"]:
                    req = self.requests.get(item["rid"])
                    if req is None or item.get("attempt") != req.attempt or item.get("step") != len(req.tokens):
                        continue  # a token of a cancelled attempt, or a replay
                    if self._accept_token(req, item["token"], m.get("t", [])):
                        decode.append(req)
                        self._arrival[req.rid] = m
            elif kind == "cancel":
                self._cancel(m["rid"], m.get("attempt"), m.get("_sender"))
        while self.waiting and self.free_slots:
            req = self._admit(self.waiting.pop(0))
            if req.tokens and self._finish_if_done(req):
                continue  # resumed after its last token: nothing left to compute
            prefill.append(req)
        for req in prefill:
            self._run_first_stage([req], prefill=True)
        if decode:
            self._run_first_stage(decode, prefill=False)

    def _admit(self, m: dict) -> ActiveRequest:
        params = SamplingParams.from_dict(m["params"])
        stopper = StopChecker(self.tokenizer, int(m["max_new_tokens"]), list(m.get("stop") or []))
        req = ActiveRequest(m["rid"], list(m["prompt_ids"]), params, stopper, m["entry"], self.free_slots.pop(0),
                            int(m.get("attempt") or 0), tokens=list(m.get("resume_tokens") or []))
        self.requests[req.rid] = req
        return req

    def _cancel(self, rid: str, attempt: int | None, sender: str | None = None) -> None:
        """Drop a request (only the given attempt of it, when named); only its entry node,
        or this node itself, may cancel it."""
        def may(entry: str) -> bool:
            return sender in (None, entry, self.route.first_peer)

        self.waiting = [m for m in self.waiting
                        if not (m["rid"] == rid and attempt in (None, m.get("attempt")) and may(m["entry"]))]
        req = self.requests.get(rid)
        if req is not None and attempt in (None, req.attempt) and may(req.entry):
            self._arrival.pop(rid, None)
            del self.requests[rid]
            self.free_slots.append(req.slot)

    def _accept_token(self, req: ActiveRequest, token: int, stage_times: list[float]) -> bool:
        """Record a sampled token; True when the request goes on."""
        now = time.perf_counter()
        if req.first_token_s is None:
            req.first_token_s = now - req.started
        for i, t in enumerate(stage_times):
            while len(req.stage_compute_s) <= i:
                req.stage_compute_s.append(0.0)
            req.stage_compute_s[i] += t
        req.tokens.append(int(token))
        self.send(req.entry, {"kind": "event", "rid": req.rid, "attempt": req.attempt,
                              "index": len(req.tokens) - 1, "token": int(token)})
        return not self._finish_if_done(req)

    def _finish_if_done(self, req: ActiveRequest) -> bool:
        """Send `done` and free the slot when the request has finished; True if it has."""
        reason = req.stopper.finish_reason(req.tokens)
        if reason is None:
            return False
        now = time.perf_counter()
        if req.first_token_s is None:
            req.first_token_s = now - req.started
        self.send(req.entry, {
            "kind": "done", "rid": req.rid, "attempt": req.attempt, "tokens": req.tokens, "prompt_tokens": req.prompt_ids,
            "text": req.stopper.text(req.tokens), "finish_reason": reason,
            "timings": {"ttft_s": round(req.first_token_s, 4), "total_s": round(now - req.started, 4),
                        "stage_compute_s": [round(t, 4) for t in req.stage_compute_s]},
        })
        del self.requests[req.rid]
        self._arrival.pop(req.rid, None)
        self.free_slots.append(req.slot)
        return True

    def _run_first_stage(self, reqs: list[ActiveRequest], prefill: bool) -> None:
        if prefill:
            (req,) = reqs
            ids = [req.prompt_ids + req.tokens]  # a resumed request re-prefills what it already produced
            start = [0]
        else:
            ids = [[r.tokens[-1]] for r in reqs]
            start = [len(r.prompt_ids) + len(r.tokens) - 1 for r in reqs]
        op = {"op": "forward", "ids": ids, "slots": [r.slot for r in reqs], "start": start}
        arrivals = [self._arrival.pop(r.rid, {}) for r in reqs]
        queued = [waited(m) for m in arrivals]
        t0 = time.perf_counter()
        out = self.host.run(op)
        dt = time.perf_counter() - t0
        for r, m, q in zip(reqs, arrivals, queued):  # stage 0's inbound hop is the token's return
            self.spans.add(r.rid, queue_s=q, compute_s=dt, net_s=wire_delay(m))
        rows = {"rids": [r.rid for r in reqs], "slots": op["slots"], "start": start,
                "samples": [r.sample_spec() for r in reqs]}
        if self.route.is_last:
            self._sample_and_return(out, rows, [dt])
        else:
            self.send(self.route.next_peer, {"kind": "forward", **rows, "x": out.cpu(), "t": [dt]})

    def _forward_downstream(self, msgs: list[dict]) -> None:
        x = torch.cat([m["x"] for m in msgs], dim=0) if len(msgs) > 1 else msgs[0]["x"]
        rows = {key: [v for m in msgs for v in m[key]] for key in ("rids", "slots", "start", "samples")}
        queued = [waited(m) for m in msgs]
        t0 = time.perf_counter()
        out = self.host.run({"op": "forward", "x": x, "slots": rows["slots"], "start": rows["start"]})
        dt = time.perf_counter() - t0
        for m, q in zip(msgs, queued):
            for rid in m["rids"]:
                self.spans.add(rid, queue_s=q, compute_s=dt, net_s=wire_delay(m))
        times = [max(m["t"][i] for m in msgs) for i in range(len(msgs[0]["t"]))] + [dt]
        if self.route.is_last:
            self._sample_and_return(out, rows, times)
        else:
            self.send(self.route.next_peer, {"kind": "forward", **rows, "x": out.cpu(), "t": times})

    def _sample_and_return(self, logits: torch.Tensor, rows: dict, times: list[float]) -> None:
        items = []
        for i, rid in enumerate(rows["rids"]):
            spec = rows["samples"][i]
            token = sample_token(logits[i], SamplingParams.from_dict(spec["params"]), int(spec["step"]))
            items.append({"rid": rid, "token": token, "attempt": spec.get("attempt"), "step": int(spec["step"])})
        msg = {"kind": "tokens", "items": items, "t": times}
        if self.route.is_first:
            self.inbox.put(msg)  # single-stage pipeline: straight back into this loop
        else:
            self.send(self.route.first_peer, msg)


def _compatible_groups(msgs: list[dict]) -> list[list[dict]]:
    """Batch decode messages (one position per row) together; prefills go alone."""
    decode = [m for m in msgs if m["x"].shape[1] == 1 and len(m["t"]) == len(msgs[0]["t"])]
    others = [[m] for m in msgs if not any(m is d for d in decode)]
    return ([decode] if decode else []) + others

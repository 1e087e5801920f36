"""The stages this node serves, per layout epoch: load on proposal, route the pipe's decoded messages
(serve/messages.py) to their workers, retire them once a newer epoch is committed and they are idle.

A replica that a new layout continues (`SwarmLayout.continues`: the same stages on the same peers
as in the committed layout) is not loaded again: its workers serve the new epoch too, under a
second key (an alias).  A worker keeps sending `forward` / `tokens` to the keys of the epoch it
was built for, and takes them only there: every worker of a chain was built for the same epoch,
so steps always meet the KV cache they belong to, and a peer that loaded afresh where the others
continued (it restarted in between) drops them rather than computing on a cache it does not have."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import torch
import trio

from hexswarm.model.config import LlamaConfig
from hexswarm.model.kv_cache import BLOCK, blocks_for
from hexswarm.runtime.cpus import engine_in_own_process
from hexswarm.runtime.engine_process import EngineJob, EngineProcess
from hexswarm.runtime.heap import freeze_heap
from hexswarm.runtime.local_link import LinkSpec, default_run_dir
from hexswarm.runtime.stage_engine import EngineSettings, PipelineRoute, StageEngine
from hexswarm.runtime.stage_host import StageHost, StageSpec, kv_tokens_that_fit
from hexswarm.runtime.tokenizer import TextTokenizer
from hexswarm.serve.layout import SwarmLayout
from hexswarm.serve.messages import NoStageHere, StageAddress, StageFacts, StageMessage

log = logging.getLogger("hexswarm.stages")

AUTO_CONTEXT = 512  # positions a request is assumed to hold when max_batch is auto
AUTO_MAX_BATCH = 256  # vLLM's default max_num_seqs

StageKey = tuple[int, int, int]  # (epoch, replica, stage index)
STEP_KINDS = ("forward", "tokens")  # taken only under the key their worker was built for (module docstring)


@dataclass(frozen=True)
class ServeSettings:
    model_dir: str
    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int = 8  # KV slots per stage; 0: as many as fit (CUDA, gpu_memory_fraction)
    max_seq_len: int = 512
    retire_idle_s: float = 5.0
    max_step_tokens: int = 512
    gather_prompts: bool = False  # see EngineSettings (the node's default: off)
    freeze_heap: bool = True  # after each load, here and in engine processes (runtime/heap.py)
    micro_batches: int = 0  # 0: one per pipeline stage
    engine_process: bool | None = None  # each stage engine in its own process (None: cpus.py engine_in_own_process)
    quantize: str | None = None  # None: as the checkpoint is; "none", "int8", "int4" (see load_stage)
    gpu_memory_fraction: float = 0.9
    local_links: bool = True  # stage engines on one host hand steps to each other directly (runtime/local_link.py)
    kv_tokens: int = 0  # KV positions per stage; 0: max_batch x max_seq_len, capped by what fits (CUDA)
    cpu_threads: int = 0  # torch intra-op threads of the stage engines (0: torch's default in the node process,
    # runtime/cpus.py engine_threads in an engine process)


class StageSet:
    def __init__(self, me: str, cfg: LlamaConfig, tokenizer: TextTokenizer, settings: ServeSettings, pipe,
                 weights=None):
        self.me = me
        self.weights = weights  # a WeightFetcher when this node's checkpoint comes from peers
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.settings = settings
        self.pipe = pipe
        self.workers: dict[StageKey, StageEngine | EngineProcess] = {}
        self.layouts: dict[int, SwarmLayout] = {}
        self.last_used: dict[StageKey, float] = {}
        self.home: dict[StageKey, StageKey] = {}  # alias -> the key its worker was built for
        self._loading: dict[int, trio.Event] = {}
        self.tokens_out = 0  # tokens the stage 0s here sent their entries (serve/backlog.py measures a rate)
        # stages whose chain cannot work: built afresh where the layout says the replica continues (this peer
        # restarted, its neighbours serve on with workers built for an older epoch), or whose neighbour sends steps
        # to one of their aliases; reported as failed, so the head re-plans and entries resume at once
        self.inconsistent: set[StageKey] = set()

    async def load_epoch(self, layout: SwarmLayout, superseded=None) -> bool:
        """Load (once) every stage `layout` gives this peer; returns when all are ready (True).  `superseded`
        (for a proposal): a callable that says a newer epoch was proposed or committed since; the stages not
        loaded yet are then left (False: no ready is due; a later load of the epoch, e.g. at its commit, loads
        them).  Under churn a restarted TP-2 peer loaded four superseded proposals one after the other, ~90 s
        each on a loaded machine, before the one that committed."""
        while layout.epoch in self._loading:
            await self._loading[layout.epoch].wait()
            keys = [(layout.epoch, ri, si) for ri, si in layout.stages_of(self.me)]
            if all(k in self.workers for k in keys):
                return True
            if layout.epoch in self._loading:  # loaded as far as it went, and not superseded: failed
                return False
        done = self._loading[layout.epoch] = trio.Event()
        self.layouts[layout.epoch] = layout
        try:
            for ri, si in layout.stages_of(self.me):
                key = (layout.epoch, ri, si)
                if key in self.workers or self._continue(layout, ri, si):
                    continue
                if superseded is not None and superseded():
                    log.info("epoch %d: replica %d stage %d not loaded: a newer epoch superseded it", layout.epoch,
                             ri, si)
                    del self._loading[layout.epoch]  # a later load of it (its commit) loads what is left
                    if not any(k[0] == layout.epoch for k in self.workers):
                        self.layouts.pop(layout.epoch, None)
                    return False
                if layout.continued(ri) is not None and any(st.peer != self.me for st in layout.replicas[ri]):
                    # its neighbours (other peers) continue workers built for an older epoch and send their steps
                    # there: this fresh one would never meet them (every step dropped, every request stalled)
                    log.warning("epoch %d: replica %d stage %d is loaded afresh where its neighbours continue; "
                                "reported failed so the head re-plans it", layout.epoch, ri, si)
                    self.inconsistent.add(key)
                if self.weights is not None:  # this stage's tensors, from peers, before it loads
                    st, n_stages = layout.replicas[ri][si], len(layout.replicas[ri])
                    await self.weights.ensure_stage(st.layer_start, st.layer_end, si == 0, si == n_stages - 1,
                                                    self.cfg.tie_word_embeddings)
                worker = await trio.to_thread.run_sync(self._build_worker, layout, ri, si)
                self.workers[key] = worker
                self.last_used[key] = time.monotonic()
                log.info("epoch %d: serving replica %d stage %d (layers %s, TP %d)", layout.epoch, ri, si,
                         layout.replicas[ri][si].layer_start, layout.replicas[ri][si].tp)
        finally:
            done.set()
        if self.settings.freeze_heap:  # once per load, not per request: a collection here, then short passes
            freeze_heap()
        return True

    def _continue(self, layout: SwarmLayout, ri: int, si: int) -> bool:
        """Serve stage (ri, si) of `layout` with the worker already loaded for the replica it continues,
        when that worker is alive and was built for the very same stages; False: load it."""
        cont = layout.continued(ri)
        if cont is None:
            return False
        old_key, key = (cont[0], cont[1], si), (layout.epoch, ri, si)
        worker, old = self.workers.get(old_key), self.layouts.get(cont[0])
        same = old is not None and cont[1] < len(old.replicas) and old.replicas[cont[1]] == layout.replicas[ri]
        alive = (worker is not None and worker.error is None
                 and getattr(getattr(worker, "host", None), "followers_alive", lambda: True)())
        if not (same and alive):
            log.info("epoch %d: replica %d stage %d cannot continue epoch %d's replica %d (%s); loading it",
                     layout.epoch, ri, si, cont[0], cont[1], "not the same stages" if not same else "not loaded here")
            return False
        self.workers[key] = worker
        self.home[key] = self.home.get(old_key, old_key)
        self.last_used[key] = time.monotonic()
        log.info("epoch %d: replica %d stage %d continues as loaded for epoch %d (no load)", layout.epoch, ri, si,
                 self.home[key][0])
        return True

    def _build_worker(self, layout: SwarmLayout, ri: int, si: int) -> StageEngine | EngineProcess:
        replica = layout.replicas[ri]
        st = replica[si]
        s = self.settings
        spec = StageSpec(s.model_dir, st.layer_start, st.layer_end, st.tp, si == 0, si == len(replica) - 1,
                         s.device, s.dtype, s.max_batch, s.max_seq_len, st.gpus, quantize=s.quantize)
        slots, kv_tokens = self.kv_size(spec)
        spec = dataclasses.replace(spec, max_batch=slots, kv_tokens=kv_tokens)
        log.info("epoch %d: stage %d holds %d requests in a KV cache of %d positions on %s", layout.epoch, si, slots,
                 kv_tokens, spec.device_of(0))
        tag, name = f"e{layout.epoch}r{ri}s{si}", f"stage-e{layout.epoch}-r{ri}-s{si}"
        route = PipelineRoute(si, len(replica), replica[si + 1].peer if si + 1 < len(replica) else None, replica[0].peer)
        engine = EngineSettings(max_step_tokens=s.max_step_tokens, micro_batches=s.micro_batches or len(replica),
                                gather_prompts=s.gather_prompts)
        send = self._sender(layout.epoch, ri, si)
        links = LinkSpec(self.me, (layout.epoch, ri, si), default_run_dir()) if s.local_links else None
        own_process = s.engine_process if s.engine_process is not None else engine_in_own_process(s.device)
        if own_process:
            worker = EngineProcess(EngineJob(spec, tag, route, engine, name, si == 0, os.getpid(), links,
                                             logging.getLogger().getEffectiveLevel(), s.freeze_heap,
                                             s.cpu_threads), send)
        else:
            if s.cpu_threads:  # else torch's own (a thread per core: on 2 cores, 1.2-1.6x the tokens/s of one
                # thread at 32 requests, though its threads spin between a small step's ops; BENCHMARKS run 24)
                torch.set_num_threads(s.cpu_threads)
            host = StageHost(spec, tag=tag)
            worker = StageEngine(host, route, send, self.tokenizer if si == 0 else None, name=name, settings=engine,
                                 links=links)  # it loads the host in its own thread
        worker.start()
        if not own_process:
            try:
                worker.wait_loaded()
            except BaseException:
                worker.close()
                raise
        return worker

    def kv_size(self, spec: StageSpec) -> tuple[int, int]:
        """(requests, KV positions) of a stage here.  The cache is paged, so requests share its
        positions: by default it holds max_batch x max_seq_len, or on CUDA what fits beside the
        weights when that is less; max_batch "auto" is what the positions hold at
        min(max_seq_len, AUTO_CONTEXT) each, at most AUTO_MAX_BATCH (8 on the CPU)."""
        s = self.settings
        fit = None
        if s.device == "cuda" and not (s.kv_tokens and s.max_batch):
            fit = kv_tokens_that_fit(self.cfg, spec.layer_end - spec.layer_start, spec.tp, spec.dtype,
                                     spec.device_of(0), s.gpu_memory_fraction)
        if s.max_batch:
            slots = s.max_batch
        elif fit is None:
            slots = 8
        else:
            slots = max(1, min(AUTO_MAX_BATCH, (s.kv_tokens or fit) // min(s.max_seq_len, AUTO_CONTEXT)))
        tokens = s.kv_tokens or slots * blocks_for(s.max_seq_len) * BLOCK  # whole blocks per request
        if not s.kv_tokens and fit is not None:
            tokens = max(min(tokens, fit), s.max_seq_len)  # one longest request, whatever fits
        return slots, tokens

    def _sender(self, epoch: int, ri: int, si: int):
        def send(peer: str, msg: dict) -> None:
            kind = msg["kind"]
            if kind == "forward":
                msg["to"] = [epoch, ri, si + 1]
            elif kind == "tokens":
                msg["to"] = [epoch, ri, 0]
            elif kind in ("events", "done"):
                msg["to_stage0"] = [epoch, ri, 0]  # lets the entry cancel this attempt
                if kind == "events":
                    self.tokens_out += len(msg.get("items") or ())  # engine threads: a lost count costs nothing
            msg["sent_at"] = time.time()  # for per-hop network time in traces
            self.pipe.send(peer, msg)

        return send

    def stage_facts(self, to: StageAddress, kind: str) -> StageFacts | None:
        """What a `kind` message to stage `to` is checked against (the pipe's decoder asks); None where no worker
        here takes it: none loaded under that key, or a step to an alias (module docstring)."""
        worker = self.workers.get(to)
        if worker is None or (kind in STEP_KINDS and to in self.home):
            return None
        return StageFacts(self.layouts[to.epoch].replicas[to.replica], worker.spec.max_batch)

    def route(self, msg: StageMessage, sender: str) -> bool:
        """Hand a decoded message to its stage's worker; False (and a log line, but not for this node's own
        cancel of a stage it may have retired since) when no worker here takes it."""
        key = msg.to
        worker = self.workers.get(key)
        if worker is None or isinstance(msg, NoStageHere):
            if worker is not None and msg.kind in STEP_KINDS and key in self.home:
                self._step_to_alias(key, msg.kind, sender)
            if not (msg.kind == "cancel" and sender == self.me):
                log.warning("no stage %s here for a %s message from %s", list(key), msg.kind, sender)
            return False
        self.last_used[key] = time.monotonic()
        worker.submit(msg.engine_message(sender, time.time()))
        return True

    def _step_to_alias(self, key: StageKey, kind: str, sender: str) -> None:
        """A step for an alias comes from a neighbour whose worker was built for the alias's epoch, not for the
        one this worker was built for (it loaded afresh): the chain is broken for good; every key of this worker
        is reported failed (only when the sender is the neighbour the layout names: no stranger can do this)."""
        layout = self.layouts.get(key[0])
        if layout is None:
            return
        stages = layout.replicas[key[1]]
        if (kind == "forward") == (key[2] == 0):  # forward goes to a later stage, tokens to stage 0
            return
        neighbour = stages[key[2] - 1].peer if kind == "forward" else stages[-1].peer
        if sender != neighbour:
            return
        worker = self.workers[key]
        names = {k for k, w in self.workers.items() if w is worker}
        if not names <= self.inconsistent:
            log.warning("epoch %d: replica %d stage %d got a %s from %s built for another epoch than its own "
                        "worker; reported failed so the head re-plans it", *key, kind, sender)
            self.inconsistent |= names

    def link_broken(self, peer: str) -> None:
        """A pipe link to or from `peer` broke: every stage 0 here whose pipeline has `peer` in it
        gives up the steps it has in flight (their frames may be lost), so their entries resume those
        requests at once rather than after the 60 s stall timer.  A later stage here whose neighbour
        `peer` is tells its pipeline's stage 0 (`link_broken` over the pipe), which could not see a link
        between two other peers break."""
        told: set[tuple[int, int]] = set()
        for (epoch, ri, si), worker in self.workers.items():
            layout = self.layouts.get(epoch)
            if peer == self.me or layout is None:
                continue
            stages = layout.replicas[ri]
            if si == 0 and any(st.peer == peer for st in stages):
                worker.submit({"kind": "_link_broken", "peer": peer})
            elif (si > 0 and (epoch, ri) not in told and stages[0].peer not in (peer, self.me)
                  and peer in {stages[si - 1].peer, stages[si + 1].peer if si + 1 < len(stages) else None}):
                told.add((epoch, ri))  # a worker under two keys (stage reuse) tells once
                self.pipe.send(stages[0].peer, {"kind": "link_broken", "peer": peer, "to": [epoch, ri, 0]})

    def spans(self, rid: str) -> list[dict]:
        """This node's timings of one request, per stage it served."""
        out = []
        for (e, r, s), w in sorted(self.workers.items()):
            span = None if (e, r, s) in self.home else w.spans.get(rid)
            if span is not None:
                out.append({"epoch": e, "replica": r, "stage": s, "peer": self.me, **span})
        return out

    def failed(self) -> list[str]:
        """"epoch:replica:stage" of every stage here whose engine stopped (gossiped: the head stops
        placing requests on its replica and plans a new epoch, the entries resume what it held)."""
        return sorted(f"{e}:{r}:{s}" for (e, r, s), w in self.workers.items()
                      if w.error is not None or (e, r, s) in self.inconsistent)

    def slot_counts(self) -> dict[str, int]:
        """"epoch:replica:stage" -> KV slots of each stage this node serves (gossiped: a pipeline
        admits at most the smallest count of its stages)."""
        return {f"{e}:{r}:{s}": w.spec.max_batch for (e, r, s), w in self.workers.items()}

    def kv_counts(self) -> dict[str, int]:
        """"epoch:replica:stage" -> KV blocks of each stage this node serves (gossiped: stage 0 admits
        a request only when its blocks fit in the smallest cache of the pipeline)."""
        return {f"{e}:{r}:{s}": blocks_for(w.spec.kv_tokens) for (e, r, s), w in self.workers.items()}

    def loads(self) -> dict[str, int]:
        """"epoch:replica" -> requests held by the stage 0 this node serves there."""
        return {f"{e}:{r}": w.in_flight for (e, r, s), w in self.workers.items() if s == 0}

    async def retire_older_than(self, epoch: int) -> None:
        """Close stages of older epochs once idle (their in-flight requests finish first)."""
        now = time.monotonic()
        retired = False
        # aliases first: a worker whose aliases all go is retired under its own key in the same pass
        for key in sorted((k for k in self.workers if k[0] < epoch), key=lambda k: k not in self.home):
            worker = self.workers[key]
            last = max(self.last_used[key], worker.last_message_at)  # steps over local links skip route()
            idle = worker.in_flight == 0 and now - last > self.settings.retire_idle_s
            if not (idle or worker.error is not None):  # a failed engine's requests were resumed elsewhere
                continue
            names = [k for k, w in self.workers.items() if w is worker]
            if key not in self.home and len(names) > 1:
                continue  # its steps are addressed here while a newer epoch's alias serves on with it
            del self.workers[key]
            self.inconsistent.discard(key)
            self.home.pop(key, None)
            self.last_used.pop(key, None)
            if not any(k[0] == key[0] for k in self.workers):
                self.layouts.pop(key[0], None)
            if len(names) > 1:
                log.info("epoch %d: replica %d stage %d serves on in a newer epoch", *key)
                continue
            await trio.to_thread.run_sync(worker.close)
            log.info("epoch %d: retired replica %d stage %d", *key)
            retired = True
        if retired and self.settings.freeze_heap:  # frozen objects are never collected: retired stages' cycles go now
            freeze_heap()

    async def close(self) -> None:
        workers = list({id(w): w for w in self.workers.values()}.values())  # aliases name one worker
        self.workers.clear()
        self.home.clear()
        for worker in workers:
            await trio.to_thread.run_sync(worker.close)

    def describe(self) -> list[dict]:
        return [{"epoch": e, "replica": r, "stage": s, "in_flight": w.in_flight,
                 "failed": None if w.error is None else repr(w.error),
                 "loaded_for": list(self.home.get((e, r, s), (e, r, s)))}
                for (e, r, s), w in sorted(self.workers.items())]

"""The stages this node serves, per layout epoch: load on proposal, route pipe
messages to them, retire them once a newer epoch is committed and they are idle."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import trio

from hexswarm.errors import ProtocolError
from hexswarm.model.config import LlamaConfig
from hexswarm.runtime.engine_process import EngineJob, EngineProcess
from hexswarm.runtime.local_link import LinkSpec, default_run_dir
from hexswarm.runtime.stage_engine import EngineSettings, PipelineRoute, StageEngine
from hexswarm.runtime.stage_host import StageHost, StageSpec, slots_that_fit
from hexswarm.runtime.tokenizer import TextTokenizer
from hexswarm.swarm.guards import check_stage_message
from hexswarm.swarm.layout import SwarmLayout

log = logging.getLogger("hexswarm.stages")

StageKey = tuple[int, int, int]  # (epoch, replica, stage index)


@dataclass(frozen=True)
class ServeSettings:
    model_dir: str
    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int = 8  # KV slots per stage; 0: as many as fit (CUDA, gpu_memory_fraction)
    max_seq_len: int = 512
    retire_idle_s: float = 5.0
    max_step_tokens: int = 512
    micro_batches: int = 0  # 0: one per pipeline stage
    engine_process: bool | None = None  # each stage engine in its own process (None: on CUDA)
    quantize: str | None = None  # None: as the checkpoint is; "none", "int8", "int4" (see load_stage)
    gpu_memory_fraction: float = 0.9
    local_links: bool = True  # stage engines on one host hand steps to each other directly (runtime/local_link.py)


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
        self._loading: dict[int, trio.Event] = {}

    async def load_epoch(self, layout: SwarmLayout) -> None:
        """Load (once) every stage `layout` gives this peer; returns when all are ready."""
        if layout.epoch in self._loading:
            await self._loading[layout.epoch].wait()
            return
        done = self._loading[layout.epoch] = trio.Event()
        self.layouts[layout.epoch] = layout
        try:
            for ri, si in layout.stages_of(self.me):
                key = (layout.epoch, ri, si)
                if key in self.workers:
                    continue
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

    def _build_worker(self, layout: SwarmLayout, ri: int, si: int) -> StageEngine | EngineProcess:
        replica = layout.replicas[ri]
        st = replica[si]
        s = self.settings
        spec = StageSpec(s.model_dir, st.layer_start, st.layer_end, st.tp, si == 0, si == len(replica) - 1,
                         s.device, s.dtype, s.max_batch, s.max_seq_len, st.gpus, quantize=s.quantize)
        if s.max_batch == 0:
            slots = self.slots(spec) if s.device == "cuda" else 8
            spec = StageSpec(**{**spec.__dict__, "n_slots": slots})
            log.info("epoch %d: %d KV slots of %d tokens fit on %s", layout.epoch, slots, s.max_seq_len,
                     spec.device_of(0))
        tag, name = f"e{layout.epoch}r{ri}s{si}", f"stage-e{layout.epoch}-r{ri}-s{si}"
        route = PipelineRoute(si, len(replica), replica[si + 1].peer if si + 1 < len(replica) else None, replica[0].peer)
        engine = EngineSettings(max_step_tokens=s.max_step_tokens, micro_batches=s.micro_batches or len(replica))
        send = self._sender(layout.epoch, ri, si)
        links = LinkSpec(self.me, (layout.epoch, ri, si), default_run_dir()) if s.local_links else None
        own_process = s.engine_process if s.engine_process is not None else s.device == "cuda"
        if own_process:
            worker = EngineProcess(EngineJob(spec, tag, route, engine, name, si == 0, os.getpid(), links,
                                             logging.getLogger().getEffectiveLevel()), send)
        else:
            host = StageHost(spec, tag=tag)
            host.start()
            worker = StageEngine(host, route, send, self.tokenizer if si == 0 else None, name=name, settings=engine,
                                 links=links)
        worker.start()
        return worker

    def slots(self, spec: StageSpec) -> int:
        """KV slots for a stage here: max_batch, or as many as fit when it is 0 ("auto")."""
        if self.settings.max_batch:
            return self.settings.max_batch
        return slots_that_fit(self.cfg, spec.layer_end - spec.layer_start, spec.tp, spec.max_len, spec.dtype,
                              spec.device_of(0), self.settings.gpu_memory_fraction)

    def _sender(self, epoch: int, ri: int, si: int):
        def send(peer: str, msg: dict) -> None:
            kind = msg["kind"]
            if kind == "forward":
                msg["to"] = [epoch, ri, si + 1]
            elif kind == "tokens":
                msg["to"] = [epoch, ri, 0]
            elif kind in ("events", "done"):
                msg["to_stage0"] = [epoch, ri, 0]  # lets the entry cancel this attempt
            msg["sent_at"] = time.time()  # for per-hop network time in traces
            self.pipe.send(peer, msg)

        return send

    def route(self, msg: dict, sender: str) -> bool:
        """Check a pipe message and hand it to its stage worker; False when this node has no
        such stage; ProtocolError when the message is malformed or from the wrong peer."""
        to = msg.get("to")
        if not (isinstance(to, list) and len(to) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in to)):
            raise ProtocolError("'to' must be [epoch, replica, stage]")
        key = tuple(to)
        worker = self.workers.get(key)
        if worker is None:
            return False
        check_stage_message(msg, sender, self.layouts[key[0]], key[1], key[2], self.cfg,
                            worker.spec.n_slots, self.settings.max_seq_len)
        self.last_used[key] = time.monotonic()
        worker.submit({**msg, "_sender": sender, "_recv_at": time.time()})
        return True

    def link_broken(self, peer: str) -> None:
        """A pipe link to or from `peer` broke: every stage 0 here whose pipeline has `peer` in it
        gives up the steps it has in flight (their frames may be lost), so their entries resume those
        requests at once rather than after the 60 s stall timer."""
        for (epoch, ri, si), worker in self.workers.items():
            layout = self.layouts.get(epoch)
            if si == 0 and peer != self.me and layout is not None and any(st.peer == peer for st in layout.replicas[ri]):
                worker.submit({"kind": "_link_broken", "peer": peer})

    def spans(self, rid: str) -> list[dict]:
        """This node's timings of one request, per stage it served."""
        out = []
        for (e, r, s), w in sorted(self.workers.items()):
            span = w.spans.get(rid)
            if span is not None:
                out.append({"epoch": e, "replica": r, "stage": s, "peer": self.me, **span})
        return out

    def failed(self) -> list[str]:
        """"epoch:replica:stage" of every stage here whose engine stopped (gossiped: the head stops
        placing requests on its replica and plans a new epoch, the entries resume what it held)."""
        return sorted(f"{e}:{r}:{s}" for (e, r, s), w in self.workers.items() if w.error is not None)

    def slot_counts(self) -> dict[str, int]:
        """"epoch:replica:stage" -> KV slots of each stage this node serves (gossiped: a pipeline
        admits at most the smallest count of its stages)."""
        return {f"{e}:{r}:{s}": w.spec.n_slots for (e, r, s), w in self.workers.items()}

    def loads(self) -> dict[str, int]:
        """"epoch:replica" -> requests held by the stage 0 this node serves there."""
        return {f"{e}:{r}": w.in_flight for (e, r, s), w in self.workers.items() if s == 0}

    async def retire_older_than(self, epoch: int) -> None:
        """Close stages of older epochs once idle (their in-flight requests finish first)."""
        now = time.monotonic()
        for key in [k for k in self.workers if k[0] < epoch]:
            worker = self.workers[key]
            last = max(self.last_used[key], worker.last_message_at)  # steps over local links skip route()
            idle = worker.in_flight == 0 and now - last > self.settings.retire_idle_s
            if idle or worker.error is not None:  # a failed engine's requests were resumed elsewhere
                del self.workers[key]
                self.last_used.pop(key, None)
                if not any(k[0] == key[0] for k in self.workers):
                    self.layouts.pop(key[0], None)
                await trio.to_thread.run_sync(worker.close)
                log.info("epoch %d: retired replica %d stage %d", *key)

    async def close(self) -> None:
        for key in list(self.workers):
            await trio.to_thread.run_sync(self.workers.pop(key).close)

    def describe(self) -> list[dict]:
        return [{"epoch": e, "replica": r, "stage": s, "in_flight": w.in_flight,
                 "failed": None if w.error is None else repr(w.error)}
                for (e, r, s), w in sorted(self.workers.items())]

"""Served stage engines wired together inside one process (no network): the serving path
minus the swarm, for `hexswarm generate` (runtime/offline.py), tests and GPU checks.
`send(peer, msg)` hands messages between engines; the entry's `events` and `done` are collected."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hexswarm.model.config import LlamaConfig
from hexswarm.runtime.engine_process import EngineJob, EngineProcess
from hexswarm.runtime.local_link import LinkSpec
from hexswarm.runtime.sampling import SamplingParams
from hexswarm.runtime.stage_engine import EngineSettings, PipelineRoute, StageEngine
from hexswarm.runtime.stage_host import StageHost, StageSpec
from hexswarm.runtime.tokenizer import TextTokenizer

ENTRY = "entry"


@dataclass(frozen=True)
class StageFailure:
    stage: int
    tp_rank: int
    what: str  # "exited with code 3", "was killed by signal 9", "failed: RuntimeError: ..."


class _FirstLogitsHost(StageHost):
    """A last stage's host that keeps a copy of its first step's logits: with one request whose prompt
    is one step, the prompt's next-token logits (`hexswarm generate`'s `logits`)."""

    first_logits: torch.Tensor | None = None

    def run(self, op: dict) -> torch.Tensor:
        out = super().run(op)
        if self.first_logits is None:
            self.first_logits = out[0].float().cpu()  # a copy: out may be a CUDA graph's buffer
        return out


class LocalPipeline:
    """layout: [(tp, layers), ...]; gpus: per stage, the CUDA ordinal of each TP rank (CUDA only);
    processes: each engine in its own process (EngineProcess), as a CUDA node runs them;
    kv_tokens: each stage's KV pool (0: max_batch x max_seq_len);
    links_dir: the engines hand steps to each other over local links there (runtime/local_link.py);
    quantize: as StageSpec's; show_progress: a progress bar while each stage leader loads;
    keep_first_logits: `first_logits` is the last stage's first step's logits (in-process engines)."""

    def __init__(self, model_dir, layout: Sequence[tuple[int, int]], max_batch: int = 8, max_seq_len: int = 128,
                 settings: EngineSettings = EngineSettings(), device: str = "cpu", dtype: str = "float32",
                 gpus: Sequence[tuple[int, ...]] | None = None, processes: bool = False,
                 links_dir: str | None = None, kv_tokens: int = 0, quantize: str | None = None,
                 show_progress: bool = False, keep_first_logits: bool = False):
        cfg = LlamaConfig.from_dir(model_dir)
        self.tokenizer = TextTokenizer(model_dir, cfg)
        self.engines: dict[str, StageEngine | EngineProcess] = {}
        self.hosts: list[StageHost] = []  # in-process engines' stage hosts, stage by stage
        self.done: queue.Queue = queue.Queue()
        self.events: dict[str, list[int]] = {}
        self.event_messages = 0
        self.elsewhere: list[tuple[str, dict]] = []  # (peer, message) for entries other than ENTRY
        self.forward_rows: list[int] = []  # rows of every forward message between stages
        self._lock = threading.Lock()
        names = [f"s{i}" for i in range(len(layout))]
        start = 0
        try:
            for i, (tp, n) in enumerate(layout):
                last = i == len(layout) - 1
                spec = StageSpec(str(model_dir), start, start + n, tp, i == 0, last, device, dtype, max_batch,
                                 max_seq_len, tuple(gpus[i]) if gpus else (), quantize=quantize, kv_tokens=kv_tokens)
                route = PipelineRoute(i, len(layout), None if last else names[i + 1], names[0])
                links = LinkSpec(names[i], (0, 0, i), links_dir) if links_dir else None
                if processes:
                    engine = EngineProcess(EngineJob(spec, f"local{i}", route, settings, names[i], i == 0, os.getpid(),
                                                     links), self.send)
                else:
                    host_type = _FirstLogitsHost if keep_first_logits and last else StageHost
                    host = host_type(spec, tag=f"local{i}", show_progress=show_progress)
                    self.hosts.append(host)
                    engine = StageEngine(host, route, self.send, self.tokenizer if i == 0 else None, names[i], settings,
                                         links)  # it loads the host in its own thread
                self.engines[names[i]] = engine
                engine.start()
                if isinstance(engine, StageEngine):
                    engine.wait_loaded()
                start += n
        except BaseException:
            self.close()
            raise
        self.first = self.engines[names[0]]

    def send(self, peer: str, msg: dict) -> None:
        if peer not in self.engines and peer != ENTRY:  # another entry node: kept apart
            with self._lock:
                self.elsewhere.append((peer, msg))
            return
        if peer == ENTRY:
            with self._lock:
                if msg["kind"] == "events":
                    self.event_messages += 1
                    for item in msg["items"]:
                        self.events.setdefault(item["rid"], []).append(item["token"])
                else:
                    self.done.put(msg)
            return
        if msg["kind"] == "forward":
            self.forward_rows.append(len(msg["rids"]))
        self.engines[peer].submit(msg)

    def start(self, rid: str, prompt: str | Sequence[int], max_new_tokens: int,
              params: SamplingParams = SamplingParams(), stop: Sequence[str] = ()) -> None:
        """A request to stage 0, as a swarm's stage 0 gets it; prompt: its text, or its token ids."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.first.submit({"kind": "start", "rid": rid, "prompt_ids": ids, "params": params.to_dict(),
                           "max_new_tokens": max_new_tokens, "stop": list(stop), "entry": ENTRY})

    def wait(self, n: int, timeout: float = 120.0) -> dict[str, dict]:
        """The `done` messages of n requests, by request id."""
        results: dict[str, dict] = {}
        while len(results) < n:
            msg = self.done.get(timeout=timeout)
            results[msg["rid"]] = msg
        return results

    @property
    def first_logits(self) -> torch.Tensor | None:
        host = self.hosts[-1] if self.hosts else None
        return host.first_logits if isinstance(host, _FirstLogitsHost) else None

    def failure(self) -> StageFailure | None:
        """The first stage that failed: a TP follower process that exited (when its leader's step failed
        too, the follower is the cause; in-process engines only), else a stage engine's error."""
        for i, host in enumerate(self.hosts):
            exited = host.exited_follower()
            if exited is not None:
                tp_rank, code = exited
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                return StageFailure(i, tp_rank, how)
        for i, engine in enumerate(self.engines.values()):
            if engine.error is not None:
                return StageFailure(i, 0, f"failed: {type(engine.error).__name__}: {engine.error}")
        return None

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        for host in self.hosts:  # closed with its engine, unless loading stopped before the engine was made
            host.close()

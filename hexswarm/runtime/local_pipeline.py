"""Served stage engines wired together inside one process (no network): the serving path
minus the swarm, for tests and GPU checks.  `send(peer, msg)` hands messages between
engines; the entry's `events` and `done` are collected."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Sequence

from hexswarm.model.config import LlamaConfig
from hexswarm.runtime.engine_process import EngineJob, EngineProcess
from hexswarm.runtime.local_link import LinkSpec
from hexswarm.runtime.sampling import SamplingParams
from hexswarm.runtime.stage_engine import EngineSettings, PipelineRoute, StageEngine
from hexswarm.runtime.stage_host import StageHost, StageSpec
from hexswarm.runtime.tokenizer import TextTokenizer

ENTRY = "entry"


class LocalPipeline:
    """layout: [(tp, layers), ...]; gpus: per stage, the CUDA ordinal of each TP rank (CUDA only);
    processes: each engine in its own process (EngineProcess), as a CUDA node runs them;
    kv_tokens: each stage's KV pool (0: max_batch x max_seq_len);
    links_dir: the engines hand steps to each other over local links there (runtime/local_link.py)."""

    def __init__(self, model_dir, layout: Sequence[tuple[int, int]], max_batch: int = 8, max_seq_len: int = 128,
                 settings: EngineSettings = EngineSettings(), device: str = "cpu", dtype: str = "float32",
                 gpus: Sequence[tuple[int, ...]] | None = None, processes: bool = False,
                 links_dir: str | None = None, kv_tokens: int = 0):
        cfg = LlamaConfig.from_dir(model_dir)
        self.tokenizer = TextTokenizer(model_dir, cfg)
        self.engines: dict[str, StageEngine | EngineProcess] = {}
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
                spec = StageSpec(str(model_dir), start, start + n, tp, i == 0, i == len(layout) - 1, device, dtype,
                                 max_batch, max_seq_len, tuple(gpus[i]) if gpus else (), kv_tokens=kv_tokens)
                route = PipelineRoute(i, len(layout), names[i + 1] if i + 1 < len(layout) else None, names[0])
                links = LinkSpec(names[i], (0, 0, i), links_dir) if links_dir else None
                if processes:
                    engine = EngineProcess(EngineJob(spec, f"local{i}", route, settings, names[i], i == 0, os.getpid(),
                                                     links), self.send)
                else:
                    host = StageHost(spec, tag=f"local{i}")
                    host.start()
                    engine = StageEngine(host, route, self.send, self.tokenizer if i == 0 else None, names[i], settings,
                                         links)
                self.engines[names[i]] = engine
                engine.start()
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

    def start(self, rid: str, prompt: str, max_new_tokens: int, params: SamplingParams = SamplingParams()) -> None:
        self.first.submit({"kind": "start", "rid": rid, "prompt_ids": self.tokenizer.encode(prompt),
                           "params": params.to_dict(), "max_new_tokens": max_new_tokens, "stop": [], "entry": ENTRY})

    def wait(self, n: int, timeout: float = 120.0) -> dict[str, dict]:
        """The `done` messages of n requests, by request id."""
        results: dict[str, dict] = {}
        while len(results) < n:
            msg = self.done.get(timeout=timeout)
            results[msg["rid"]] = msg
        return results

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()

"""Served stages wired in one process (no network): concurrent requests, continuous
batching with chunked prefill, micro-batches, TP followers, and outputs equal to `generate`."""

from __future__ import annotations

import queue
import threading

import pytest

from hexswarm.model.config import LlamaConfig
from hexswarm.runtime.offline import GenerateJob, generate
from hexswarm.runtime.sampling import SamplingParams
from hexswarm.runtime.stage_host import StageHost, StageSpec
from hexswarm.runtime.stage_engine import EngineSettings, PipelineRoute, StageEngine
from hexswarm.runtime.tokenizer import TextTokenizer

PROMPTS = ["Hello, world!", "Once upon a time", "The quick brown fox", "0123456789", "Pipeline stages"]


class LocalRouter:
    """send(peer, msg) between workers of one process; 'entry' collects events."""

    def __init__(self):
        self.workers: dict[str, StageEngine] = {}
        self.done: queue.Queue = queue.Queue()
        self.events: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        self.batch_sizes: list[int] = []
        self.event_messages = 0

    def send(self, peer: str, msg: dict) -> None:
        if peer == "entry":
            with self.lock:
                if msg["kind"] == "events":
                    self.event_messages += 1
                    for item in msg["items"]:
                        self.events.setdefault(item["rid"], []).append(item["token"])
                else:
                    self.done.put(msg)
            return
        if msg["kind"] == "forward":
            self.batch_sizes.append(len(msg["rids"]))
        self.workers[peer].submit(msg)


def build_pipeline(model_dir, layout, router, n_slots=8, settings=EngineSettings()):
    cfg = LlamaConfig.from_dir(model_dir)
    tok = TextTokenizer(model_dir, cfg)
    names = [f"s{i}" for i in range(len(layout))]
    start = 0
    for i, (tp, n) in enumerate(layout):
        spec = StageSpec(str(model_dir), start, start + n, tp, i == 0, i == len(layout) - 1, n_slots=n_slots, max_len=128)
        host = StageHost(spec, tag=f"t{i}")
        host.start()
        route = PipelineRoute(i, len(layout), names[i + 1] if i + 1 < len(layout) else None, names[0])
        w = StageEngine(host, route, router.send, tokenizer=tok if i == 0 else None, name=names[i], settings=settings)
        router.workers[names[i]] = w
        w.start()
        start += n
    return tok, router.workers[names[0]]


@pytest.mark.parametrize("layout,settings", [
    ([(1, 4)], EngineSettings()),
    ([(1, 4)], EngineSettings(max_step_tokens=5)),  # prompts in chunks, decode rows beside them
    ([(1, 1), (2, 3)], EngineSettings()),
    ([(2, 2), (1, 1), (1, 1)], EngineSettings(max_step_tokens=7, micro_batches=3)),
], ids=["single", "single-chunked", "1+tp2", "tp2+1+1-chunked-microbatched"])
def test_concurrent_requests_match_generate(tiny_model, layout, settings):
    router = LocalRouter()
    tok, first = build_pipeline(tiny_model, layout, router, settings=settings)
    try:
        params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=30, seed=9)]
        for i, prompt in enumerate(PROMPTS):
            first.submit({"kind": "start", "rid": f"r{i}", "prompt_ids": tok.encode(prompt),
                          "params": params[i % 2].to_dict(), "max_new_tokens": 10, "stop": [], "entry": "entry"})
        results = {}
        while len(results) < len(PROMPTS):
            msg = router.done.get(timeout=60)
            results[msg["rid"]] = msg
    finally:
        for w in router.workers.values():
            w.close()
    for i, prompt in enumerate(PROMPTS):
        ref = generate(GenerateJob(model_dir=str(tiny_model), prompt=prompt, max_new_tokens=10, sampling=params[i % 2]))
        got = results[f"r{i}"]
        assert got["tokens"] == ref["tokens"], (prompt, layout)
        assert got["text"] == ref["text"]
        assert router.events[f"r{i}"] == got["tokens"]  # every token streamed once, in order
    if len(layout) > 1:
        assert max(router.batch_sizes) > 1, "decode steps of concurrent requests were never batched"
    assert first.rows_run > first.steps_run, "no step carried more than one row"
    assert router.event_messages < sum(len(v) for v in router.events.values()), "token events were never batched"

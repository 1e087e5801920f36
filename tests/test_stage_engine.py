"""Served stages wired in one process (no network): concurrent requests, continuous
batching with chunked prefill, micro-batches, TP followers, and outputs equal to `generate`."""

from __future__ import annotations

import time

import pytest

from hexswarm.runtime.local_pipeline import LocalPipeline
from hexswarm.runtime.offline import GenerateJob, generate
from hexswarm.runtime.stage_engine import EngineSettings
from hexswarm.runtime.sampling import SamplingParams

PROMPTS = ["Hello, world!", "Once upon a time", "The quick brown fox", "0123456789", "Pipeline stages"]


@pytest.mark.parametrize("layout,settings", [
    ([(1, 4)], EngineSettings()),
    ([(1, 4)], EngineSettings(max_step_tokens=5)),  # prompts in chunks, decode rows beside them
    ([(1, 4)], EngineSettings(max_step_tokens=5, overlap=True)),  # step k+1 fed from step k's unread tokens
    # new prompts join a step without waiting for the one on the device
    ([(1, 4)], EngineSettings(max_step_tokens=5, overlap=True, gather_prompts=False)),
    ([(1, 1), (2, 3)], EngineSettings()),
    ([(2, 2), (1, 1), (1, 1)], EngineSettings(max_step_tokens=7, micro_batches=3)),
], ids=["single", "single-chunked", "single-chunked-overlapped",
    "single-chunked-overlapped-ungathered", "1+tp2", "tp2+1+1-chunked-microbatched"])
def test_concurrent_requests_match_generate(tiny_model, layout, settings):
    pipe = LocalPipeline(tiny_model, layout, settings=settings)
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=30, seed=9)]
    try:
        for i, prompt in enumerate(PROMPTS):
            pipe.start(f"r{i}", prompt, 10, params[i % 2])
        results = pipe.wait(len(PROMPTS), timeout=60)
    finally:
        pipe.close()
    for i, prompt in enumerate(PROMPTS):
        ref = generate(GenerateJob(model_dir=str(tiny_model), prompt=prompt, max_new_tokens=10, sampling=params[i % 2]))
        got = results[f"r{i}"]
        assert got["tokens"] == ref["tokens"], (prompt, layout)
        assert got["text"] == ref["text"]
        assert pipe.events[f"r{i}"] == got["tokens"]  # every token streamed once, in order
    if len(layout) > 1:
        assert max(pipe.forward_rows) > 1, "decode steps of concurrent requests were never batched"
    assert pipe.first.rows_run > pipe.first.steps_run, "no step carried more than one row"
    assert pipe.event_messages < sum(len(v) for v in pipe.events.values()), "token events were never batched"


@pytest.mark.parametrize("layout", [[(1, 4)], [(1, 2), (1, 2)]], ids=["single", "two-stages"])
def test_engines_in_their_own_processes_match_generate(tiny_model, layout):
    pipe = LocalPipeline(tiny_model, layout, processes=True, settings=EngineSettings(max_step_tokens=6, overlap=True))
    try:
        for i, prompt in enumerate(PROMPTS[:3]):
            pipe.start(f"r{i}", prompt, 8)
        results = pipe.wait(3, timeout=120)
        spans = pipe.first.spans
        deadline = time.monotonic() + 5
        while spans.get("r0") is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the child reports its spans every STATE_S
        assert spans.get("r0")["steps"] > 0
    finally:
        pipe.close()
    for i, prompt in enumerate(PROMPTS[:3]):
        ref = generate(GenerateJob(model_dir=str(tiny_model), prompt=prompt, max_new_tokens=8))
        assert results[f"r{i}"]["tokens"] == ref["tokens"]
        assert pipe.events[f"r{i}"] == ref["tokens"]


def test_a_request_id_is_its_entrys_and_bad_messages_do_not_stop_the_engine(tiny_model):
    """Red-team findings 4 and 5 (issue 13): a start with a malformed field is dropped (the engine goes on),
    and the same request id through another entry is refused instead of taking over the first's tokens."""
    pipe = LocalPipeline(tiny_model, [(1, 4)])
    try:
        ids = pipe.tokenizer.encode(PROMPTS[0])
        pipe.first.submit({"kind": "start", "rid": "bad", "prompt_ids": ids, "params": {"top_k": "x"},
                           "max_new_tokens": 4, "stop": [], "entry": "entry"})
        pipe.start("r0", PROMPTS[0], 6)
        pipe.first.submit({"kind": "start", "rid": "r0", "prompt_ids": ids, "params": {}, "max_new_tokens": 6,
                           "stop": [], "entry": "intruder"})
        results = pipe.wait(2, timeout=60)
        time.sleep(0.2)
    finally:
        pipe.close()
    assert "error" in results["bad"]
    assert [m.get("error", "") for peer, m in pipe.elsewhere if peer == "intruder"] == [
        "request id r0 is already running from another entry node"]
    ref = generate(GenerateJob(model_dir=str(tiny_model), prompt=PROMPTS[0], max_new_tokens=6))
    assert results["r0"]["tokens"] == ref["tokens"]  # the first request kept its tokens
    assert pipe.first.error is None


def test_a_step_with_non_finite_activations_is_dropped_and_the_stage_goes_on(tiny_model, caplog):
    """Finiteness is checked by the engine on its device (not on the node's event loop): a NaN step from
    the previous stage is dropped with a log line; the next well-formed request is served as `generate` does."""
    import torch

    pipe = LocalPipeline(tiny_model, [(1, 2), (1, 2)])
    try:
        second = pipe.engines["s1"]
        second.submit({"kind": "forward", "steps": [999], "rows": [[0, 0, 2]], "rids": ["x"],
                       "samples": [{"params": {}, "step": 0, "attempt": 0}], "x": torch.full((2, 64), float("nan")),
                       "t": [0.0], "_sender": "s0"})
        pipe.start("r0", PROMPTS[1], 5)
        results = pipe.wait(1, timeout=60)
    finally:
        pipe.close()
    assert second.error is None
    assert "dropped a forward step with non-finite activations from s0" in caplog.text
    ref = generate(GenerateJob(model_dir=str(tiny_model), prompt=PROMPTS[1], max_new_tokens=5))
    assert results["r0"]["tokens"] == ref["tokens"]


def test_a_newer_attempt_taking_an_id_back_mid_step_is_served_as_generate(tiny_model):
    """Chaos found it (issue 13): stage 0 counted an in-flight step of a replaced attempt against the new
    attempt of the same request id, and the engine died in _schedule / _input_ids.  Here attempts replace each
    other while their steps are in flight on a 3-stage pipeline; the last attempt is served as `generate` does."""
    pipe = LocalPipeline(tiny_model, [(1, 1), (1, 2), (1, 1)], settings=EngineSettings(max_step_tokens=4, micro_batches=3))
    ids = pipe.tokenizer.encode(PROMPTS[2])
    try:
        for attempt in range(8):
            pipe.first.submit({"kind": "start", "rid": "r", "prompt_ids": ids, "params": {}, "max_new_tokens": 12,
                               "stop": [], "entry": "entry", "attempt": attempt})
            deadline = time.monotonic() + 5
            while attempt < 7 and not pipe.forward_rows and time.monotonic() < deadline:
                time.sleep(0.001)  # a step of this attempt is on its way before the next one takes the id
            pipe.forward_rows.clear()
        results = pipe.wait(1, timeout=60)
    finally:
        pipe.close()
    assert pipe.first.error is None
    assert results["r"]["attempt"] == 7
    ref = generate(GenerateJob(model_dir=str(tiny_model), prompt=PROMPTS[2], max_new_tokens=12))
    assert results["r"]["tokens"] == ref["tokens"]


def test_a_broken_link_hands_the_requests_in_flight_back_to_their_entries(tiny_model):
    """A pipe link of the pipeline broke (say, its relay died) and took a step with it: stage 0 ends the
    requests it has in flight with an error at once, so their entries resume them, instead of holding a
    step that never returns for 60 s; the resumed attempt is served as `generate` does."""
    pipe = LocalPipeline(tiny_model, [(1, 2), (1, 2)])
    lost = []

    def lossy(peer, msg):  # the link dies once the first tokens are out: forwards go nowhere
        if msg["kind"] == "forward" and pipe.events.get("r"):
            lost.append(msg)
        else:
            pipe.send(peer, msg)

    pipe.first.send = lossy
    try:
        pipe.start("r", PROMPTS[3], 16)
        deadline = time.monotonic() + 30
        while not lost and time.monotonic() < deadline:
            time.sleep(0.01)
        pipe.first.submit({"kind": "_link_broken", "peer": "s1"})
        failed = pipe.wait(1, timeout=10)["r"]
        pipe.first.send = pipe.send
        tokens = pipe.events["r"]
        pipe.first.submit({"kind": "start", "rid": "r", "prompt_ids": pipe.tokenizer.encode(PROMPTS[3]), "params": {},
                           "max_new_tokens": 16, "stop": [], "entry": "entry", "attempt": 1, "resume_tokens": tokens})
        done = pipe.wait(1, timeout=60)["r"]
    finally:
        pipe.close()
    assert failed["error"] == "pipeline link to s1 broke" and lost
    ref = generate(GenerateJob(model_dir=str(tiny_model), prompt=PROMPTS[3], max_new_tokens=16))
    assert done["tokens"] == ref["tokens"]
    assert pipe.first.error is None


def test_a_stage_is_loaded_by_the_thread_that_steps_it(tiny_model, monkeypatch):
    """One thread loads and steps a stage (two OpenMP teams made CPU decoding 1.2-1.4x slower, BENCHMARKS
    run 26f); the threads are recorded by the real StageHost's start and run."""
    import threading

    from hexswarm.runtime.stage_host import StageHost

    seen: dict[str, set] = {"start": set(), "run": set()}
    start, run = StageHost.start, StageHost.run

    def spy_start(self):
        seen["start"].add(threading.current_thread().name)
        return start(self)

    def spy_run(self, op):
        seen["run"].add(threading.current_thread().name)
        return run(self, op)

    monkeypatch.setattr(StageHost, "start", spy_start)
    monkeypatch.setattr(StageHost, "run", spy_run)
    pipe = LocalPipeline(tiny_model, [(1, 2), (1, 2)])
    try:
        pipe.start("r0", PROMPTS[0], 4)
        assert len(pipe.wait(1, timeout=60)["r0"]["tokens"]) == 4
    finally:
        pipe.close()
    assert len(seen["start"]) == 2 and seen["start"] == seen["run"], seen
    assert threading.main_thread().name not in seen["start"]


def test_a_stage_that_fails_to_load_raises_in_the_caller(tiny_model):
    """The engine's thread loads; the error reaches whoever waits for the load, as it did when the
    caller loaded, and the engine's thread is gone."""
    from hexswarm.errors import UserError
    from hexswarm.runtime.stage_engine import PipelineRoute, StageEngine
    from hexswarm.runtime.stage_host import StageHost, StageSpec

    spec = StageSpec(str(tiny_model), 0, 99, 1, True, True, "cpu", "float32", 2, 64)  # layers past the model's
    engine = StageEngine(StageHost(spec, tag="bad"), PipelineRoute(0, 1, None, "s0"), lambda peer, msg: None)
    engine.start()
    with pytest.raises(UserError, match="lacks tensor model.layers"):
        engine.wait_loaded()
    engine.close()
    assert not engine._thread.is_alive()

"""Hostile input: malformed pipeline messages never reach torch, floods get 'busy', nodes keep serving."""

from __future__ import annotations

from contextlib import asynccontextmanager

import math
from types import SimpleNamespace

import pytest
import torch
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from hexswarm.errors import ProtocolError
from hexswarm.model.config import LlamaConfig
from hexswarm.net.ratelimit import PeerRateLimiter
from hexswarm.launcher import LocalSwarm
from hexswarm.serve.layout import StageAssignment, SwarmLayout
from hexswarm.serve.messages import StageAddress, StageFacts, decode_stage_message
from swarmutil import reference, submit_many
from entry_port_fake import port_of

LAYOUT = SwarmLayout(1, "A", "m", ("A", "B"), ((StageAssignment("A", 1, 0, 2), StageAssignment("B", 1, 2, 4)),))


@pytest.fixture(scope="module")
def cfg(tiny_model):
    return LlamaConfig.from_dir(tiny_model)


def check_stage_message(msg, sender, layout, replica, stage, cfg, max_batch, max_seq_len):
    """The pipe's decoder's checks of `msg` to stage `stage` of `replica` in `layout`, with max_batch KV slots."""
    return decode_stage_message(msg, sender, StageAddress(layout.epoch, replica, stage),
                                StageFacts(layout.replicas[replica], max_batch), cfg, max_seq_len)


def good_forward(B=2, T=1, H=64):
    return {"kind": "forward", "to": [1, 0, 1], "steps": [0], "rids": [f"r{i}" for i in range(B)],
            "rows": [[i, 5, T] for i in range(B)], "samples": [{"params": {"temperature": 0.0}, "step": 1}] * B,
            "x": torch.zeros(B * T, H), "t": [0.01]}


def test_well_formed_messages_pass(cfg):
    check_stage_message(good_forward(), "A", LAYOUT, 0, 1, cfg, 8, 128)
    check_stage_message({"kind": "tokens", "to": [1, 0, 0], "steps": [0], "items": [{"rid": "r", "token": 5, "step": 0}],
                         "t": []},
                        "B", LAYOUT, 0, 0, cfg, 8, 128)


@pytest.mark.parametrize("mutate,why", [
    (lambda m: m.update(x=torch.zeros(2, 65)), "shape"),
    (lambda m: m.update(x=torch.zeros(3, 64)), "shape"),
    (lambda m: m.update(x=torch.zeros(2, 64, dtype=torch.int64)), "float"),
    (lambda m: m.update(x=torch.zeros(9, 64), rids=["r"] * 9, rows=[[i, 0, 1] for i in range(9)],
                        samples=[{"params": {}, "step": 0}] * 9), "rows"),
    (lambda m: m.update(rows=[[0, 5, 1], [8, 5, 1]]), "out of range"),
    (lambda m: m.update(rows=[[0, 127, 2], [1, 0, 2]], x=torch.zeros(4, 64)), "out of range"),
    (lambda m: m.update(steps=[-1]), "steps"),
    (lambda m: m.update(rids=["r0"]), "rids"),
    (lambda m: m.update(samples=[{"params": {"top_p": 7}, "step": 1}] * 2), "sampling"),
    (lambda m: m.update(x="not a tensor"), "float"),
])
def test_malformed_activations_are_refused(cfg, mutate, why):
    msg = good_forward()
    mutate(msg)
    with pytest.raises(ProtocolError, match=why):
        check_stage_message(msg, "A", LAYOUT, 0, 1, cfg, 8, 128)


def test_messages_from_the_wrong_peer_are_refused(cfg):
    with pytest.raises(ProtocolError, match="previous stage"):
        check_stage_message(good_forward(), "B", LAYOUT, 0, 1, cfg, 8, 128)
    with pytest.raises(ProtocolError, match="last stage"):
        check_stage_message({"kind": "tokens", "items": []}, "A", LAYOUT, 0, 0, cfg, 8, 128)


values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["forward", "tokens", "start", "cancel", "link_broken", "other"]),
       st.dictionaries(st.sampled_from(["x", "rids", "rows", "steps", "samples", "t", "items", "prompt_ids",
                                        "max_new_tokens", "rid", "entry", "stop", "params", "resume_tokens", "peer",
                                        "ignore_eos"]),
                       values, max_size=10),
       st.sampled_from([0, 1]))
def test_random_messages_raise_only_protocol_errors(cfg, kind, fields, stage):
    try:
        check_stage_message({"kind": kind, **fields}, "A" if stage else "B", LAYOUT, 0, stage, cfg, 8, 128)
    except ProtocolError:
        pass


def test_rate_limiter_holds_a_peer_to_its_rate():
    now = [0.0]
    rl = PeerRateLimiter(rate_per_s=10, burst=20, clock=lambda: now[0])
    assert sum(rl.allow("p") for _ in range(100)) == 20  # the burst
    assert rl.allow("q")  # another peer is not affected
    now[0] += 1.0
    assert sum(rl.allow("p") for _ in range(100)) == 10
    assert rl.retry_after_s("p") > 0


@asynccontextmanager
async def stranger_pipe(addr: str):
    """A pipe stream to the node at `addr` from a fresh, unadmitted identity (the attacker)."""
    import multiaddr
    from libp2p.custom_types import TProtocol

    from hexswarm.net import identity
    from hexswarm.net.host import dial, make_host, parse_peer_multiaddr
    from hexswarm.net.protocols import PIPE

    info = parse_peer_multiaddr(addr)
    host = make_host(identity.generate())
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        await dial(host, info)
        stream = await host.new_stream(info.peer_id, [TProtocol(PIPE)])
        try:
            yield stream
        finally:
            await trio.sleep(0.5)  # let the node read it all before the connection goes
            await stream.close()


def test_garbage_on_the_pipe_and_a_flood_leave_the_swarm_serving(tiny_model, tmp_path):
    from hexswarm.net import codec

    sw = LocalSwarm(tmp_path, tiny_model, [1, 1], serve_layout={"hetero_config": [1, 1], "pp_partition": [2, 2]},
                    extra={"max_queue": 4, "dispatch_wait_s": 5.0})
    sw.start()
    try:
        st_ = sw.wait_layout(90)
        stage1 = next(n for n in sw.nodes if n.peer_id == st_["replicas"][0]["stages"][1]["peer"])
        epoch = st_["layout"]["epoch"]

        async def attack():
            async with stranger_pipe(stage1.addr) as s:
                bad = good_forward()
                bad["to"] = [epoch, 0, 1]
                bad["x"] = torch.full((2, 1, 64), math.nan)
                await s.write(codec.frame(bad))  # NaN activations from a peer that is not stage 0
                await s.write(b"\x00\x00\x00\x05garbage")  # a corrupt frame
                await s.write(b"\xff\xff\xff\xff")  # an absurd length

        trio.run(attack)
        # a flood beyond max_queue at one entry: some are told 'busy', none hang, the rest are right
        flood = submit_many([(sw.nodes[0].addr, {"prompt": f"Hello {i}", "max_new_tokens": 30}) for i in range(12)])
        busy = [r for r in flood if "error" in r]
        assert busy and all(r["error"]["code"] == "busy" and "retry after" in r["error"]["message"] for r in busy)
        for i, r in enumerate(flood):
            if "done" in r:
                assert r["done"]["tokens"] == reference(tiny_model, f"Hello {i}", 30)["tokens"]
        (after,) = submit_many([(sw.nodes[1].addr, {"prompt": "Hello, world!", "max_new_tokens": 8})])
        assert after["done"]["tokens"] == reference(tiny_model, "Hello, world!", 8)["tokens"]
        assert "activations from a peer that is not the previous stage" in stage1.log()
    finally:
        sw.stop()


def test_pinned_layout_fits_as_many_replicas_as_the_peers_allow(cfg):
    from hexswarm.serve.planning import PeerView, pinned_layout

    dev = {"kind": "cpu", "name": "cpu", "memory_gib": 4, "tflops": 1, "mem_bw_gbs": 5}
    # ids chosen so that id order alone would give a TP-1 stage to a two-device peer
    peers = [PeerView("a-two", [dev, dev], {}), PeerView("b-two", [dev, dev], {}),
             PeerView("c-one", [dev], {}), PeerView("d-one", [dev], {})]
    reps = pinned_layout(cfg, peers, {"hetero_config": [2, 1], "pp_partition": [2, 2], "replicas": 2})
    assert len(reps) == 2
    assert sorted((r[0].peer, r[1].peer) for r in reps) == [("a-two", "c-one"), ("b-two", "d-one")]


@pytest.mark.parametrize("field", ["max_new_tokens", "top_k", "seed", "temperature"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 2**70])
def test_non_finite_or_huge_submit_numbers_are_a_one_line_error(field, value):
    """Red-team finding 1 (issue 13): int(inf) in the submit parser escaped the stream handler and ended the node."""
    from hexswarm.errors import UserError

    if field in ("temperature", "max_new_tokens") and value == 2**70:
        return  # valid: a near-uniform draw; a budget the node clamps to its context
    from hexswarm.serve.submit import SubmitService

    with pytest.raises(UserError):
        SubmitService(None).parse({"prompt": "hello", field: value})


@pytest.mark.parametrize("field", ["stop", "stream", "request_id", "timeout_s", "resumed", "seed", "prompt",
                                   "ignore_eos"])
def test_a_tensor_in_any_submit_field_is_a_one_line_error(field):
    """Found by the chaos run's hostile sender: `stop`, `stream` or `request_id` holding a tensor reached a truth
    test in the submit parser ("Boolean value of Tensor ... is ambiguous"), an unexpected error on the stream."""
    import torch

    from hexswarm.errors import UserError
    from hexswarm.serve.submit import SubmitService

    svc = SubmitService(None)
    svc.port = port_of(SimpleNamespace(cfg=SimpleNamespace(max_position_embeddings=64),
                                       settings=SimpleNamespace(max_seq_len=64)))
    try:
        req = svc.parse({"prompt": "hello", field: torch.zeros(3)})
    except UserError:
        return
    assert field == "resumed" and req["resumed"] is False  # anything but `true` is not a resubmission


@pytest.mark.parametrize("to", [[math.inf, 0, 0], [1, 0], "x", [1, 0, -1], [True, 0, 0], None])
def test_a_malformed_stage_address_is_a_protocol_error(cfg, to):
    """Red-team finding 2 (issue 13): a direct-path frame {"kind": "cancel", "to": [inf, 0, 0]} ended the node."""
    from hexswarm.serve.messages import PipelineDecoder
    from hexswarm.serve.stages import ServeSettings, StageSet

    stages = StageSet("A", cfg, None, ServeSettings(model_dir="unused"), pipe=None)
    with pytest.raises(ProtocolError):
        PipelineDecoder(cfg, 128, stages.stage_facts).decode({"kind": "cancel", "to": to, "rid": "x"}, "B")


def test_tokens_injected_by_a_peer_that_is_not_stage_0_are_ignored(tiny_model, tmp_path):
    """Red-team finding 8 (issue 13): a peer that knows a request id sends `events` and `done` for it to the
    entry; only the attempt's stage 0 speaks for a request, so the client still gets the real tokens."""
    import threading
    import time as clock

    from hexswarm.net import codec
    from hexswarm.api.client import submit_to

    sw = LocalSwarm(tmp_path, tiny_model, [1, 1], serve_layout={"hetero_config": [1, 1], "pp_partition": [2, 2]})
    sw.start()
    try:
        sw.wait_layout(90)
        entry = sw.nodes[0]
        req = {"prompt": "Once upon a time", "max_new_tokens": 300, "stream": True, "request_id": "victim"}
        got, first, done_at = {}, threading.Event(), []

        def client():
            got["final"] = trio.run(submit_to, entry.addr, req, lambda f: "token" in f and first.set(), 120)
            done_at.append(clock.monotonic())

        t = threading.Thread(target=client)
        t.start()
        assert first.wait(60)

        async def inject():
            async with stranger_pipe(entry.addr) as s:
                for attempt in (0, 1):
                    await s.write(codec.frame({"kind": "events", "items": [
                        {"rid": "victim", "attempt": attempt, "index": i, "token": 7} for i in range(400)]}))
                    await s.write(codec.frame({"kind": "done", "rid": "victim", "attempt": attempt, "tokens": [7],
                                               "prompt_tokens": [1], "text": "x", "finish_reason": "stop",
                                               "timings": {}}))

        trio.run(inject)
        injected_at = clock.monotonic()
        t.join(120)
        assert done_at and done_at[0] > injected_at - 0.3, "the request ended before the injection: proves nothing"
        ref = reference(tiny_model, req["prompt"], 300)
        assert got["final"]["done"]["tokens"] == ref["tokens"]
    finally:
        sw.stop()


THREE = SwarmLayout(1, "A", "m", ("A", "B", "C"), ((StageAssignment("A", 1, 0, 1), StageAssignment("B", 1, 1, 2),
                                                    StageAssignment("C", 1, 2, 4)),))


def test_a_link_broken_notice_is_taken_only_from_a_later_stage_of_the_pipeline_about_one_of_its_peers(cfg):
    notice = {"kind": "link_broken", "to": [1, 0, 0], "peer": "C"}
    check_stage_message(notice, "B", THREE, 0, 0, cfg, 8, 128)
    for sender, peer, stage, why in (("X", "C", 0, "not in this pipeline"), ("A", "C", 0, "not in this pipeline"),
                                     ("B", "X", 0, "link_broken peer"), ("B", 7, 0, "link_broken peer"),
                                     ("C", "B", 1, "not in this pipeline")):
        with pytest.raises(ProtocolError, match=why):
            check_stage_message({**notice, "peer": peer}, sender, THREE, 0, stage, cfg, 8, 128)


def test_a_middle_stage_that_loses_a_neighbour_tells_its_stage_0(cfg):
    """Stage 0 cannot see the link between two later stages break; the stage that does tells it, once per
    pipeline, and only for a neighbour's link (a far peer's link breaking loses none of its steps)."""
    from types import SimpleNamespace

    from hexswarm.serve.stages import ServeSettings, StageSet

    sent = []
    stages = StageSet("B", cfg, None, ServeSettings(model_dir="unused"), pipe=SimpleNamespace(
        send=lambda peer, msg: sent.append((peer, msg))))
    stages.layouts[1] = THREE
    stages.workers[(1, 0, 1)] = SimpleNamespace(submit=lambda msg: pytest.fail("not stage 0"))
    stages.link_broken("C")
    assert sent == [("A", {"kind": "link_broken", "peer": "C", "to": [1, 0, 0]})]
    sent.clear()
    stages.link_broken("A")  # stage 0 itself: its own pipe sees that link break
    stages.link_broken("Z")
    assert sent == []


def _good_start() -> dict:
    return {"kind": "start", "to": [1, 0, 0], "rid": "r", "entry": "E", "attempt": 1, "prompt_ids": [1, 2, 3],
            "max_new_tokens": 4, "resume_tokens": [5], "stop": ["x"], "params": {"temperature": 0.5, "seed": 3},
            "ignore_eos": True}


def _good_dispatch() -> dict:
    return {"rid": "r", "entry": "E", "attempt": 1, "prompt_ids": [1, 2, 3], "max_new_tokens": 4,
            "resume_tokens": [5], "stop": ["x"], "params": {"temperature": 0.5, "seed": 3}, "resumed": True,
            "ignore_eos": True}


def _with_tensors(msg: dict):
    """`msg` with one field (or one element of a list field, or one sampling parameter) replaced by a tensor of
    several values, each way in turn."""
    many = torch.zeros(3)
    for key, value in msg.items():
        yield key, {**msg, key: many}
        if isinstance(value, list) and value:
            yield f"{key}[0]", {**msg, key: [many, *value[1:]]}
        if isinstance(value, dict):
            for sub in value:
                yield f"{key}.{sub}", {**msg, key: {**value, sub: many}}


def test_a_tensor_in_any_field_of_a_start_or_dispatch_is_a_protocol_error(cfg):
    """Found by the 10-minute chaos run's hostile sender: a dispatch whose `resume_tokens` was a tensor reached
    `resume_tokens or []` in the guard ("Boolean value of Tensor ... is ambiguous"), an unexpected error."""
    from hexswarm.serve.messages import decode_dispatch

    check_stage_message(_good_start(), "A", LAYOUT, 0, 0, cfg, 8, 128)
    assert decode_dispatch(_good_dispatch(), "E", cfg, 128).resume_tokens == [5]
    for where, msg in _with_tensors(_good_start()):
        if where in ("kind", "to", "to[0]"):
            continue  # routing fields: read before the checks (stage_address) and by kind
        with pytest.raises(ProtocolError):
            check_stage_message(msg, "A", LAYOUT, 0, 0, cfg, 8, 128)
    for where, msg in _with_tensors(_good_dispatch()):
        if where == "resumed":
            assert decode_dispatch(msg, "E", cfg, 128).resumed is False  # only `true` marks a resubmission
            continue
        with pytest.raises(ProtocolError):
            decode_dispatch(msg, "E", cfg, 128)

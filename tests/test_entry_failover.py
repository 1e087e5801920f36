"""Issue 13's chaos run: 0 lost.  The three mechanisms the 10-minute run's losses asked for, each tested without a
swarm: a client leaves an entry that stopped answering (keepalives, submit/2) and resubmits the same request
elsewhere, which the swarm allows (requests scoped by entry); an entry refuses what the swarm cannot serve in
time (serve/backlog.py); placement goes over the pipe, and a head that does not answer is asked again after a
back-off shared by every request of the entry (serve/placement.py)."""

from __future__ import annotations

from types import SimpleNamespace

import multiaddr
import pytest
import trio
import trio.testing

from hexswarm.net import identity
from hexswarm.net.framing import read_frame, write_frame
from hexswarm.net.host import make_host
from hexswarm.net.protocols import SUBMIT2, RemoteError, RequestError
from hexswarm.serve import backlog
from hexswarm.serve.submit import SubmitService
from entry_port_fake import port_of

LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


# ---- 1. a client whose entry stops answering resubmits elsewhere -----------------------------------------------
def _addr(host) -> str:
    return f"{host.get_addrs()[0]}/p2p/{host.get_id().to_base58()}" if "/p2p/" not in str(host.get_addrs()[0]) \
        else str(host.get_addrs()[0])


def test_a_client_leaves_an_entry_that_froze_and_gets_every_token_once():
    """The 10-minute run lost 159 requests to the client's window running out on entries that were killed or
    frozen: the client waited for a frame for its whole timeout.  Entry A accepts, sends two tokens and freezes
    (no frame, no keepalive); the client resubmits the same request (id, seed) marked resumed to entry B within
    its silence limit, and sees tokens 0..3 once each; A's stream is reset (A stops the request when it wakes)."""
    from hexswarm.api.client import SwarmClient

    seen_by_b: list[dict] = []
    a_ended = trio.Event()
    frames: list[dict] = []

    async def entry_a(stream):
        await read_frame(stream)
        await write_frame(stream, {"accepted": {"request_id": "r"}})
        for i in range(2):
            await write_frame(stream, {"token": 10 + i, "index": i})
        try:
            await read_frame(stream, timeout=30)  # frozen: nothing more; the client's reset ends this
        except Exception:
            pass
        a_ended.set()

    async def entry_b(stream):
        msg = await read_frame(stream)
        seen_by_b.append(msg)
        await write_frame(stream, {"accepted": {"request_id": msg["request_id"]}})
        for i in range(1, 4):  # one token more than it need send: the client passes each index on once
            await write_frame(stream, {"token": 10 + i, "index": i})
        await write_frame(stream, {"done": {"tokens": [10, 11, 12, 13]}})

    async def main():
        a, b = make_host(identity.generate()), make_host(identity.generate())
        async with a.run(LISTEN), b.run(LISTEN):
            a.set_stream_handler(SUBMIT2, entry_a)
            b.set_stream_handler(SUBMIT2, entry_b)
            async with SwarmClient([_addr(a), _addr(b)], timeout=60, silent_s=1.5) as client:
                t0 = trio.current_time()
                final = await client.submit({"prompt": "hi", "seed": 7, "request_id": "r", "max_new_tokens": 4},
                                            frames.append)
                took = trio.current_time() - t0
            with trio.fail_after(5):
                await a_ended.wait()
        return final, took

    final, took = trio.run(main)
    assert final == {"done": {"tokens": [10, 11, 12, 13]}}
    assert took < 10  # the silence limit, not the request's 60 s
    assert [(f["index"], f["token"]) for f in frames if "token" in f] == [(0, 10), (1, 11), (2, 12), (3, 13)]
    (again,) = seen_by_b
    assert again["request_id"] == "r" and again["seed"] == 7 and again["resumed"] is True
    assert again["resume_tokens"] == [10, 11]  # what the client has: B's pipeline continues after it
    assert 0 < again["timeout_s"] <= 60


def test_a_client_stays_with_a_slow_entry_that_sends_keepalives():
    from hexswarm.api.client import SwarmClient

    calls = []

    async def slow_entry(stream):
        calls.append(await read_frame(stream))
        for _ in range(6):  # 3 s of a swarm that gives nothing yet: keepalives only
            await write_frame(stream, {"keepalive": True})
            await trio.sleep(0.5)
        await write_frame(stream, {"done": {"tokens": [1]}})

    async def main():
        a = make_host(identity.generate())
        async with a.run(LISTEN):
            a.set_stream_handler(SUBMIT2, slow_entry)
            frames = []
            async with SwarmClient([_addr(a)], timeout=60, silent_s=1.5) as client:
                final = await client.submit({"prompt": "hi", "max_new_tokens": 1}, frames.append)
            return final, frames

    final, frames = trio.run(main)
    assert final == {"done": {"tokens": [1]}} and len(calls) == 1
    assert not any("keepalive" in f for f in frames)  # transport frames are not the caller's


def test_the_entry_sends_a_keepalive_whenever_it_had_nothing_to_send():
    from hexswarm.serve.submit import KEEPALIVE_S

    put: list[tuple[float, dict]] = []
    writer = SimpleNamespace(put=lambda f: put.append((trio.current_time(), f)))

    async def main():
        last, finished = [trio.current_time()], trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(SubmitService._keep_alive, writer, last, finished)
            await trio.sleep(3 * KEEPALIVE_S + 0.1)
            last[0] = trio.current_time()  # a token went out: the next keepalive waits a whole interval from it
            await trio.sleep(KEEPALIVE_S - 0.1)
            n = len(put)
            await trio.sleep(0.2)
            finished.set()
        return n

    n_before = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert n_before == 3 and len(put) == 4 and all(f == {"keepalive": True} for _, f in put)


def _engine_start():
    """StageEngine._start on a bare engine: which starts does stage 0 queue, which does it refuse?"""
    from hexswarm.runtime.stage_engine import StageEngine

    engine = object.__new__(StageEngine)
    engine.requests, engine.waiting, sent = {}, [], []
    engine.send = lambda peer, msg: sent.append((peer, msg))
    return engine, sent


def _start(rid: str, entry: str) -> dict:
    return {"kind": "start", "rid": rid, "entry": entry, "attempt": 1, "prompt_ids": [1, 2], "max_new_tokens": 4,
            "params": {}, "stop": []}


def test_a_resubmission_through_another_entry_is_not_refused_at_stage_0():
    """Stage 0 refuses a request id already live from another entry (a peer that knows an id must not take a
    request over); a client's failover through another entry while the first entry's copy still ran met that
    refusal until the copy ended.  Entries scope the ids they place (wire_id): two entries, two requests."""
    a, b = SubmitService(None), SubmitService(None)
    a.port = port_of(SimpleNamespace(me="12D3KooWentryAAAAAAAAAA"))
    b.port = port_of(SimpleNamespace(me="12D3KooWentryBBBBBBBBBB"))
    engine, sent = _engine_start()
    engine._start(_start(a.wire_id("r"), "A"))
    engine._start(_start(b.wire_id("r"), "B"))
    assert len(engine.waiting) == 2 and not sent
    assert a.wire_id("r") != b.wire_id("r") and a.wire_id("r").startswith("r@")
    engine, sent = _engine_start()  # unscoped, as before: the second entry's copy is refused
    engine._start(_start("r", "A"))
    engine._start(_start("r", "B"))
    assert len(engine.waiting) == 1 and "already running from another entry" in sent[0][1]["error"]


# ---- 2. bounded acceptance -------------------------------------------------------------------------------------
def test_the_service_rate_counts_tokens_per_busy_second_over_its_window():
    rate = backlog.ServiceRate(window_s=30.0, min_busy_s=3.0)
    rate.sample(0, False, now=0.0)
    for t in range(1, 3):
        rate.sample(t * 10, True, now=float(t))
    assert rate.rate() is None  # 2 busy seconds: not enough to say
    for t in range(3, 5):
        rate.sample(t * 10, True, now=float(t))
    for t in range(5, 20):  # idle: no tokens, not busy; the rate stays what the busy time showed
        rate.sample(40, False, now=float(t))
    assert rate.rate() == pytest.approx(10.0)
    rate.sample(40, False, now=100.0)  # the busy samples left the window
    assert rate.rate() is None


class _Peer:
    def __init__(self, **extra):
        self.record = SimpleNamespace(extra=extra, incarnation=1)


def _swarm(owed_here: int, peers: dict[str, dict], healthy=(0, 1)):
    """An entry "E" whose committed layout has replicas with stage 0 on A and B."""
    layout = SimpleNamespace(replicas=[[SimpleNamespace(peer="A")], [SimpleNamespace(peer="B")]])
    return SimpleNamespace(
        me="E", committed=layout, healthy_replicas=lambda lay: list(healthy),
        service_rate=backlog.ServiceRate(), serving_view=lambda: ["A", "B", "E"],
        submit_service=SimpleNamespace(owed=lambda: owed_here),
        node=SimpleNamespace(table=SimpleNamespace(get=lambda p: _Peer(**peers[p]) if p in peers else None)))


def test_a_new_request_is_refused_when_the_swarm_cannot_serve_it_in_time():
    """At 2 requests/s the entries accepted far more than the pipelines served (0.15 requests/s under the faults)
    and the requests waited until their clients gave up: lost.  Two stage 0s at 10 tokens/s each, a 240-s
    deadline: at most 25% of it (60 s = 1200 tokens) of backlog."""
    peers = {"A": {"rate": 10.0, "owed": 300}, "B": {"rate": 10.0, "owed": 300}}
    assert backlog.refusal(_swarm(500, peers), 24, 240.0) is None  # 1124 tokens: 56 s
    why = backlog.refusal(_swarm(700, peers), 24, 240.0)  # 1324 tokens: 66 s
    assert why.startswith("busy: ") and "retry after" in why
    # one replica down: half the rate
    assert backlog.refusal(_swarm(0, peers, healthy=(0,)), 24, 240.0) is not None
    # a stage 0 not measured yet counts as the others do; none measured: no bound from here (the head's cap)
    assert backlog.refusal(_swarm(500, {"A": {"rate": 10.0}, "B": {}}), 24, 240.0) is None
    assert backlog.refusal(_swarm(10**6, {"A": {}, "B": {}}), 24, 240.0) is None
    # what peers claim is checked: garbage counts as nothing, huge numbers are clamped
    assert backlog.refusal(_swarm(0, {"A": {"rate": "x", "owed": -5}, "B": {"rate": float("nan")}}), 24, 240.0) is None


def test_the_entry_refuses_a_new_request_up_front_but_never_a_resumed_one():
    from test_exactly_once import FakeEntryServer

    server = FakeEntryServer()
    layout = SimpleNamespace(replicas=[[SimpleNamespace(peer="s0")]])
    server.committed = layout
    server.healthy_replicas = lambda lay: [0]
    server.service_rate = backlog.ServiceRate()
    server.serving_view = lambda: ["s0", "entry"]
    server.node.table = SimpleNamespace(get=lambda p: _Peer(rate=1.0, owed=1000), seconds_since_seen=lambda e: 0.0)
    svc = SubmitService(None)
    svc.port = port_of(server)
    server.submit_service = svc
    frames = []

    async def emit(frame):
        frames.append(frame)

    async def main():
        new = await svc.serve({"prompt": "hi", "request_id": "n", "max_new_tokens": 1, "timeout_s": 240}, emit)
        again = await svc.serve({"prompt": "hi", "request_id": "o", "max_new_tokens": 1, "resumed": True}, emit)
        return new, again

    new, again = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert new["error"]["code"] == "busy" and new["error"]["message"].startswith("busy: the swarm owes")
    assert [s["rid"] for s in server.starts] == [svc.wire_id("o")]  # the new one was never placed
    assert "done" in again
    assert svc.owed() == 0  # nothing held any more


# ---- 3. placement over the pipe, and a head that does not answer -------------------------------------------------
class _PipeServer:
    def __init__(self, head="H"):
        self.me, self.sent, self.order = "E", [], [head]
        self.pipe = SimpleNamespace(send=lambda peer, msg: self.sent.append((peer, msg)))

    def head_order(self):
        return list(self.order)


def test_a_placement_over_the_pipe_ends_with_the_head_s_answer_or_when_it_cannot_come():
    from hexswarm.serve.messages import decode_placed
    from hexswarm.serve.placement import PipeDispatch

    server = _PipeServer()
    pd = PipeDispatch(server)
    msg = {"rid": "r@E", "attempt": 3, "entry": "E"}
    placement = {"epoch": 1, "replica": 0, "head": "H", "attempt": 3, "stages": [{"peer": "S", "tp": 1, "layers": [0, 4]}]}
    out = {}

    async def main():
        async def ask(name, m, timeout=30.0):
            try:
                out[name] = await pd.ask("H", m, timeout)
            except RequestError as e:
                out[name] = e

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "placed", msg)
            await trio.sleep(1)
            answer = decode_placed({"kind": "placed", "rid": "r@E", "attempt": 3, "placement": placement})
            pd._on_placed(answer, "X")  # not the head
            pd._on_placed(answer, "H")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "refused", {**msg, "attempt": 4})
            await trio.sleep(1)
            pd._on_placed(decode_placed({"kind": "placed", "rid": "r@E", "attempt": 4,
                                         "error": {"code": "no_layout", "message": "no live pipeline"}}), "H")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "unreachable", {**msg, "attempt": 5})
            await trio.sleep(1)
            pd.send_failed("H", server.sent[-1][1])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "head changed", {**msg, "attempt": 6})
            await trio.sleep(1)
            server.order = ["G", "H"]
        server.order = ["H"]
        await ask("silent", {**msg, "attempt": 7}, 5.0)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert out["placed"] == placement
    assert isinstance(out["refused"], RemoteError) and out["refused"].code == "no_layout"
    assert "unreachable" in str(out["unreachable"]) and "no longer the head" in str(out["head changed"])
    assert "within 5 s" in str(out["silent"])
    assert [m["kind"] for _, m in server.sent] == ["dispatch"] * 5 and not pd._waiting


def test_the_head_answers_a_dispatch_frame_with_a_placed_frame():
    from hexswarm.serve.messages import decode_dispatch
    from hexswarm.serve.placement import PipeDispatch

    placement = {"epoch": 1, "replica": 0, "head": "H", "attempt": 2, "stages": []}
    server = _PipeServer()
    server.cfg = SimpleNamespace(vocab_size=100)
    server.settings = SimpleNamespace(max_seq_len=64)

    async def dispatch(req):
        if req["rid"] == "bad@E":
            raise RemoteError("busy", "busy: every pipeline is full")
        return {**placement, "attempt": req["attempt"]}

    server.dispatch = dispatch
    pd = PipeDispatch(server)
    frame = {"kind": "dispatch", "rid": "r@E", "entry": "E", "attempt": 2, "prompt_ids": [1, 2], "max_new_tokens": 4,
             "params": {}, "stop": [], "resume_tokens": [], "resumed": False}

    async def main():
        async with trio.open_nursery() as nursery:
            pd._nursery = nursery
            pd._on_dispatch(decode_dispatch(frame, "E", server.cfg, 64), "E")
            pd._on_dispatch(decode_dispatch({**frame, "rid": "bad@E"}, "E", server.cfg, 64), "E")
    trio.run(main)
    replies = {m["rid"]: m for peer, m in server.sent if peer == "E"}
    assert replies["r@E"]["placement"]["attempt"] == 2 and replies["bad@E"]["error"]["code"] == "busy"
    with pytest.raises(Exception):  # a dispatch naming another entry than its sender is dropped
        decode_dispatch(frame, "M", server.cfg, 64)


def test_waiting_requests_do_not_storm_a_head_that_does_not_answer():
    """In the 10-minute run every resuming request asked the head for itself, several times a second (each
    try a new libp2p stream); a busy head then answered none of them in time.  Asks to a head that did not
    answer back off (0.5 s doubling to 8 s), shared by all of the entry's requests, and each takes a new
    attempt number."""
    from test_exactly_once import FakeEntryServer

    server = FakeEntryServer()
    server.head_order = lambda: ["H"]
    asks: list[tuple[float, str, int]] = []

    async def ask(head, msg, timeout):
        asks.append((trio.current_time(), msg["rid"], msg["attempt"]))
        if trio.current_time() < 20:
            raise RequestError("head H unreachable")
        return {"epoch": 1, "replica": 0, "head": "H", "attempt": msg["attempt"],
                "stages": [{"peer": "s0", "tp": 1, "layers": [0, 4]}]}

    server.placement = SimpleNamespace(ask=ask)
    svc = SubmitService(None)
    svc.port = port_of(server)
    server.head_settings = SimpleNamespace(dispatch_wait_s=30.0)

    async def main():
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(svc.place, {"rid": f"r{i}", "prompt_ids": [1], "params": {}, "max_new_tokens": 1,
                                               "stop": []})

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    before = [t for t, _, _ in asks if t < 20]
    assert len(before) <= 20 * 6  # rounds at 0, 0.5, 1.5, 3.5, 7.5, 15.5 s; without the back-off 500+ asks
    assert len(asks) - len(before) == 20  # each placed once the head answered
    for i in range(20):  # every ask of a request took a newer attempt number
        attempts = [a for _, rid, a in asks if rid == svc.wire_id(f"r{i}")]
        assert attempts == list(range(1, len(attempts) + 1))


def test_a_request_queued_behind_others_at_a_busy_stage_0_is_not_taken_for_stalled():
    """In an overloaded chaos run ~28 requests waited for one replica's 8 slots; after 60 s without a token each
    was declared stalled, cancelled and placed again at the back of a queue.  While its stage 0 keeps emitting
    (`emitted` in its record) the request waits (up to QUEUED_STALL_S); a stage 0 that emits nothing is stalled."""
    from test_exactly_once import FakeEntryServer

    from hexswarm.serve.submit import STALL_TIMEOUT_S

    def run(stage0_busy: bool) -> int:
        server = FakeEntryServer(silent=1)  # the first placement gets no token from its stage 0 ...
        emitted = lambda: int(trio.current_time() * 10) if stage0_busy else 5  # noqa: E731
        stage0 = SimpleNamespace(record=SimpleNamespace(incarnation=1, extra={}))
        server.node.table = SimpleNamespace(get=lambda p: stage0, seconds_since_seen=lambda e: 0.0,
                                            down_after=lambda e: 10.0)

        async def main():
            svc = _svc(server)
            async with trio.open_nursery() as nursery:
                async def tick():  # the stage 0's record, as gossip refreshes it
                    while True:
                        stage0.record.extra["emitted"] = emitted()
                        await trio.sleep(0.5)

                nursery.start_soon(tick)
                async def finish_later():  # ... until its turn comes, 100 s on
                    await trio.sleep(100)
                    server.entries[svc.wire_id("r")].send_nowait(
                        {"kind": "done", "rid": svc.wire_id("r"), "attempt": server.starts[0]["attempt"],
                         "_sender": "s0", "prompt_tokens": [1, 2, 3], "tokens": [7], "text": "x",
                         "finish_reason": "length", "timings": {}})

                nursery.start_soon(finish_later)
                final = await svc.serve({"prompt": "hi", "request_id": "r", "max_new_tokens": 1}, _noop)
                nursery.cancel_scope.cancel()
            return final

        final = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        assert "done" in final, final
        return len(server.starts)

    assert 100 > STALL_TIMEOUT_S
    assert run(stage0_busy=True) == 1  # waited its turn on its first placement
    assert run(stage0_busy=False) == 2  # a stage 0 that emits nothing: resumed elsewhere after the stall timeout


async def _noop(frame):
    pass


def _svc(server) -> SubmitService:
    svc = SubmitService(None)
    svc.port = port_of(server)
    return svc


def test_a_resubmission_to_the_same_entry_never_repeats_an_attempt_it_asked_for():
    """A head that did not answer in time may still have started an attempt at a stage 0; a resubmission taken
    over by the same entry numbered its attempts from the last *placed* one and repeated that number ("start of
    request ... repeats attempt 6", refused at stage 0, in a chaos run).  Attempts go on from the last asked."""
    from test_exactly_once import FakeEntryServer

    server = FakeEntryServer()
    server.head_order = lambda: ["H"]
    server.head_settings = SimpleNamespace(dispatch_wait_s=5.0)
    asked: list[int] = []

    async def ask(head, msg, timeout):
        asked.append(msg["attempt"])
        if len(asked) <= 3:
            raise RequestError("no placement from head H within 10 s")  # (it may have placed it all the same)
        server.entries[msg["rid"]].send_nowait({"kind": "done", "rid": msg["rid"], "attempt": msg["attempt"],
                                                "_sender": "s0", "prompt_tokens": [1, 2, 3], "tokens": [7],
                                                "text": "x", "finish_reason": "length", "timings": {}})
        return {"epoch": 1, "replica": 0, "head": "H", "attempt": msg["attempt"],
                "stages": [{"peer": "s0", "tp": 1, "layers": [0, 4]}]}

    server.placement = SimpleNamespace(ask=ask)
    svc = _svc(server)
    finals = {}

    async def main():
        async with trio.open_nursery() as nursery:
            async def one(name, msg):
                finals[name] = await svc.serve(msg, _noop)

            nursery.start_soon(one, "first", {"prompt": "hi", "request_id": "r", "max_new_tokens": 1})
            await trio.sleep(1.2)  # three asks unanswered so far
            nursery.start_soon(one, "again", {"prompt": "hi", "request_id": "r", "max_new_tokens": 1, "resumed": True})

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert "done" in finals["again"] and finals["first"]["error"]["code"] == "replaced"
    assert asked == sorted(set(asked)), asked  # strictly increasing across both serves


def test_a_failover_entry_continues_after_the_tokens_the_client_has():
    """A resubmission carries the tokens its client already has: the new entry places it as a resume from them
    (no token generated twice) and its token frames go on from their count, the text continuing after theirs."""
    from test_exactly_once import FakeEntryServer

    server = FakeEntryServer()
    server.cfg.vocab_size = 100
    server.tokenizer = SimpleNamespace(encode=lambda text: [1, 2, 3], decode=lambda ids, **k: "".join(f"<{i}>" for i in ids))

    async def dispatch(msg):
        placement = await FakeHeadServer_dispatch(server, msg)
        ch = server.entries[msg["rid"]]
        for i, t in ((2, 12), (3, 13)):
            ch.send_nowait({"kind": "event", "rid": msg["rid"], "attempt": msg["attempt"], "index": i, "token": t,
                            "_sender": "s0"})
        ch.send_nowait({"kind": "done", "rid": msg["rid"], "attempt": msg["attempt"], "_sender": "s0",
                        "prompt_tokens": [1, 2, 3], "tokens": [10, 11, 12, 13], "text": "x", "finish_reason": "length",
                        "timings": {}})
        return placement

    server.dispatch = dispatch
    frames = []

    async def emit(frame):
        frames.extend(frame.get("batch") or [frame])

    final = trio.run(_svc(server).serve, {"prompt": "hi", "request_id": "r", "max_new_tokens": 4, "stream": True,
                                          "resumed": True, "resume_tokens": [10, 11]}, emit,
                     clock=trio.testing.MockClock(autojump_threshold=0))
    assert final["done"]["tokens"] == [10, 11, 12, 13]
    assert server.starts[-1]["resume_tokens"] == [10, 11]
    assert [(f["index"], f["token"]) for f in frames if "token" in f] == [(2, 12), (3, 13)]
    with pytest.raises(Exception):  # tokens that are not the model's are refused
        _svc(server).parse({"prompt": "hi", "resumed": True, "resume_tokens": [100]})


async def FakeHeadServer_dispatch(server, msg):
    from test_exactly_once import FakeHeadServer

    return await FakeHeadServer.dispatch(server, msg)

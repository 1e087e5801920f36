"""Exactly-once failover (issue 13): each cause of requests lost in the chaos run (`tools/chaos.py`), kept as a
test without a swarm: the entry's resumes and failovers, and the head committing layouts under churn."""

from __future__ import annotations

from types import SimpleNamespace

import trio
import trio.testing

from hexswarm.serve.submit import SubmitService
from entry_port_fake import port_of


class FakeHeadServer:
    """The parts of a serving node `SubmitService.place` uses, with this node as the head."""

    def __init__(self):
        self.me = "entry"
        self.head_settings = SimpleNamespace(dispatch_wait_s=1.0)
        self.starts: list[dict] = []

    def head_order(self) -> list[str]:
        return [self.me]

    async def dispatch(self, msg: dict) -> dict:
        self.starts.append(dict(msg))
        return {"epoch": 1, "replica": 0, "head": self.me, "attempt": msg["attempt"],
                "stages": [{"peer": "s0", "tp": 1, "layers": [0, 4]}]}


async def _ignore(frame: dict) -> None:
    pass


def test_every_resume_of_a_request_takes_a_newer_attempt():
    """Stage 0 refuses a start whose attempt is not newer than the last it saw for (entry, rid); resumes that
    all carried attempt 2 were refused there, stalled 60 s each and were lost (chaos run, 2026-11-25)."""
    server = FakeHeadServer()
    svc = SubmitService(None)
    svc.port = port_of(server)
    req = {"rid": "r", "prompt_ids": [1, 2], "params": {}, "max_new_tokens": 8, "stop": []}

    async def main():
        await svc.place(req)
        deadline = trio.current_time() + 10
        await svc._resume(req, [5], deadline, _ignore)
        await svc._resume(req, [5, 6], deadline, _ignore)

    trio.run(main)
    assert [s["attempt"] for s in server.starts] == [1, 2, 3]
    assert [s["resume_tokens"] for s in server.starts] == [[], [5], [5, 6]]


def test_tries_the_head_refuses_do_not_use_up_a_request_s_pipelines():
    """While no layout could be formed, each resume try (refused `no_layout` by the head) took an attempt
    number, and a request that then lost one more pipeline ended "failed on 17 pipelines" having run on 3
    (chaos run, 2026-11-25): only placements count towards MAX_ATTEMPTS."""
    from hexswarm.net.protocols import RemoteError
    from hexswarm.serve.submit import MAX_ATTEMPTS

    server = FakeHeadServer()
    server.serving_view = lambda: ["s0"]
    server.committed = None
    send, receive = trio.open_memory_channel(100)
    svc = SubmitService(None)
    svc.port = port_of(server)
    placed = []
    refusals = MAX_ATTEMPTS + 4

    async def dispatch(msg: dict) -> dict:
        nonlocal refusals
        if len(placed) == 1 and refusals > 0:  # the second placement waits for a layout
            refusals -= 1
            raise RemoteError("no_layout", "no live pipeline in epoch 1 after 1 s; retry later")
        placed.append(msg["attempt"])
        end = {"error": "stage lost"} if len(placed) < 3 else {
            "prompt_tokens": [1, 2], "tokens": [7], "text": "x", "finish_reason": "length", "timings": {}}
        send.send_nowait({"kind": "done", "rid": msg["rid"], "attempt": msg["attempt"], "_sender": "s0", **end})
        return await FakeHeadServer.dispatch(server, msg)

    server.dispatch = dispatch
    req = {"rid": "r", "prompt_ids": [1, 2], "params": {}, "max_new_tokens": 1, "stop": [], "stream": False}

    async def main():
        placement = await svc.place(req)
        return await svc._relay(_ignore, req, placement, receive, trio.current_time() + 600)

    final = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert "done" in final, final
    assert len(placed) == 3 and placed[-1] > MAX_ATTEMPTS


class FakeEntryServer(FakeHeadServer):
    """A whole entry node for `SubmitService.serve`: the head's placements finish at once (a done from stage 0)
    unless `silent`; the first `refuse` tries are refused with that error."""

    def __init__(self, refuse: list[tuple[str, str]] = (), silent: int = 0):
        super().__init__()
        self.cfg = SimpleNamespace(max_position_embeddings=64)
        self.settings = SimpleNamespace(max_seq_len=64)
        self.tokenizer = SimpleNamespace(encode=lambda text: [1, 2, 3])
        stage0 = SimpleNamespace(record=SimpleNamespace(incarnation=1))  # always heard from
        self.node = SimpleNamespace(config=SimpleNamespace(max_queue=8, down_after_s=2.0),
                                    table=SimpleNamespace(get=lambda peer: stage0, seconds_since_seen=lambda e: 0.0,
                                                          down_after=lambda e: 2.0))
        self.pipe = SimpleNamespace(send=lambda peer, msg: None)
        self.entries: dict = {}
        self.committed = None
        self.refuse, self.silent = list(refuse), silent

    def serving_view(self) -> list[str]:
        return ["s0"]

    async def dispatch(self, msg: dict) -> dict:
        from hexswarm.net.protocols import RemoteError

        if self.refuse:
            raise RemoteError(*self.refuse.pop(0))
        placement = await super().dispatch(msg)
        if len(self.starts) > self.silent:
            self.entries[msg["rid"]].send_nowait({"kind": "done", "rid": msg["rid"], "attempt": msg["attempt"],
                                                  "_sender": "s0", "prompt_tokens": [1, 2, 3], "tokens": [7],
                                                  "text": "x", "finish_reason": "length", "timings": {}})
        return placement


def _service(server) -> SubmitService:
    svc = SubmitService(None)
    svc.port = port_of(server)
    return svc


def test_a_client_failover_is_resumed_not_refused():
    """A client whose entry died submits the accepted request again through another entry (`resumed`); that entry
    answered "busy" or "no live pipeline" like for a new request, and the request was lost (chaos run)."""
    server = FakeEntryServer(refuse=[("busy", "busy: every pipeline has 32 requests queued"),
                                     ("no_layout", "no live pipeline in epoch 3 after 30 s")])
    frames = []

    async def emit(frame):
        frames.append(frame)

    final = trio.run(_service(server).serve, {"prompt": "hi", "request_id": "r", "max_new_tokens": 1,
                                              "resumed": True}, emit, clock=trio.testing.MockClock(autojump_threshold=0))
    assert "done" in final, final
    assert server.starts[-1]["resumed"] is True  # the head does not refuse it for load either
    assert any("waiting" in f for f in frames) and any("accepted" in f for f in frames)


def test_a_resubmission_to_the_same_entry_takes_over_with_a_newer_attempt():
    """A client that gave up on its stream (no frame for its timeout) and came back to the same entry got "already
    running" (lost); and a request id this entry had served started again at attempt 1, which stage 0 refuses."""
    server = FakeEntryServer(silent=1)  # the first placement never answers: its client gives up
    svc = _service(server)
    finals = {}

    async def main():
        async with trio.open_nursery() as nursery:
            async def one(name: str, msg: dict):
                finals[name] = await svc.serve(msg, _ignore)

            nursery.start_soon(one, "first", {"prompt": "hi", "request_id": "r", "max_new_tokens": 1})
            await trio.sleep(5)
            nursery.start_soon(one, "again", {"prompt": "hi", "request_id": "r", "max_new_tokens": 1,
                                              "resumed": True})

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert "done" in finals["again"], finals
    assert finals["first"]["error"]["code"] == "replaced"
    assert [s["attempt"] for s in server.starts] == [1, 2]
    assert not server.entries and not svc.running


def test_a_stage_0_that_refuses_for_a_while_does_not_use_up_the_request():
    """A restarted stage-0 peer answers "stage ... is not served" until it has loaded the committed epoch's stages
    (seconds, longer on a loaded machine); the entry re-placed at once each time, the head chose the same replica,
    and 16 placements went in a moment: "failed" (chaos run).  Resumes back off while placements give nothing."""
    server = FakeEntryServer()
    loaded_at = 30.0

    async def dispatch(msg: dict) -> dict:
        placement = await FakeHeadServer.dispatch(server, msg)
        end = ({"error": "stage [3, 0, 0] is not served by s0"} if trio.current_time() < loaded_at else
               {"prompt_tokens": [1, 2, 3], "tokens": [7], "text": "x", "finish_reason": "length", "timings": {}})
        server.entries[msg["rid"]].send_nowait({"kind": "done", "rid": msg["rid"], "attempt": msg["attempt"],
                                                "_sender": "s0", **end})
        return placement

    server.dispatch = dispatch
    final = trio.run(_service(server).serve, {"prompt": "hi", "request_id": "r", "max_new_tokens": 1}, _ignore,
                     clock=trio.testing.MockClock(autojump_threshold=0))
    assert "done" in final, final


def test_token_events_lost_on_the_way_still_reach_the_client_once_each_in_order():
    """A pipe link that breaks loses the frames written to it just before (serve/pipe.py); stage 0's next
    `events` go over a new link.  The entry took every later token for one it already had (index ahead of its
    count) and relayed the `done`: the client got accepted, then done with 24 tokens, and was streamed none of
    them ("duplicated", chaos0-200, chaos run 2026-11-26).  Attempt 1 loses the events of token 2: the entry
    resumes from the 2 tokens it has; attempt 2 loses those of its last token: the done brings it."""
    want = [11, 12, 13, 14, 15, 16]
    server = FakeEntryServer()
    server.tokenizer = SimpleNamespace(encode=lambda text: [1, 2, 3],
                                       decode=lambda ids: "".join(chr(ord("a") + i % 26) for i in ids))
    lost = [{2}, {5}]  # per placement: the token indices whose events never arrive

    async def dispatch(msg: dict) -> dict:
        placement = await FakeHeadServer.dispatch(server, msg)
        channel, gone = server.entries[msg["rid"]], lost.pop(0)
        for i in range(len(msg["resume_tokens"]), len(want)):
            if i not in gone:
                channel.send_nowait({"kind": "event", "rid": msg["rid"], "attempt": msg["attempt"], "index": i,
                                     "token": want[i], "_sender": "s0"})
        channel.send_nowait({"kind": "done", "rid": msg["rid"], "attempt": msg["attempt"], "_sender": "s0",
                             "prompt_tokens": [1, 2, 3], "tokens": list(want), "text": "lmnopq",
                             "finish_reason": "length", "timings": {}})
        return placement

    server.dispatch = dispatch
    frames = []

    async def emit(frame):
        frames.extend(frame.get("batch") or [frame])

    final = trio.run(_service(server).serve, {"prompt": "hi", "request_id": "r", "max_new_tokens": 6,
                                              "stream": True}, emit, clock=trio.testing.MockClock(autojump_threshold=0))
    assert final["done"]["tokens"] == want
    streamed = [(f["index"], f["token"]) for f in frames if "token" in f]
    assert streamed == list(enumerate(want))
    assert "".join(f["text"] for f in frames if "token" in f) == "lmnopq"
    assert [s["resume_tokens"] for s in server.starts] == [[], [11, 12]]


def test_a_done_that_does_not_continue_the_tokens_relayed_is_not_relayed():
    assert SubmitService._events_lost({"kind": "done", "tokens": [11, 12, 13]}, [11, 12]) is None
    assert SubmitService._events_lost({"kind": "done", "tokens": [11, 99, 13]}, [11, 12]) is not None
    assert SubmitService._events_lost({"kind": "done", "tokens": [11]}, [11, 12]) is not None
    assert SubmitService._events_lost({"kind": "done", "error": "stage lost"}, [11, 12]) is None
    assert SubmitService._events_lost({"kind": "event", "index": 2, "token": 7}, [11, 12]) is None
    assert SubmitService._events_lost({"kind": "event", "index": 3, "token": 7}, [11, 12]) is not None


def test_a_stage_0_whose_token_events_cannot_be_sent_tells_the_entry_over_a_new_link():
    """Token events that cannot be sent to an entry stop their requests at stage 0 (the entry may be gone).  When
    only the link broke, the entry heard nothing and waited for its stall timer (60 to 240 s) before resuming:
    it is told (a `done` error, which a new link carries), once per request; a notice that fails too only cancels."""
    from hexswarm.serve import serving
    from hexswarm.serve.messages import decode_done

    server = object.__new__(serving.Server)
    routed, sent = [], []
    server.__dict__.update(me="S0", stages=SimpleNamespace(route=lambda msg, sender: routed.append(msg)),
                           pipe=SimpleNamespace(send=lambda peer, msg: sent.append((peer, msg))))
    to = [3, 0, 0]
    first = {"kind": "events", "to_stage0": to, "items": [{"rid": "a@E", "attempt": 2, "index": 4, "token": 9},
                                                          {"rid": "b@E", "attempt": 1, "index": 0, "token": 5}]}
    behind = {"kind": "events", "to_stage0": to, "items": [{"rid": "a@E", "attempt": 2, "index": 5, "token": 8}]}
    server._on_send_failed("E", [first, behind])
    assert [(m.kind, list(m.to), m.rid, m.attempt) for m in routed] == [
        ("cancel", to, "a@E", 2), ("cancel", to, "b@E", 1), ("cancel", to, "a@E", 2)]
    assert [(peer, m["rid"], m["attempt"]) for peer, m in sent] == [("E", "a@E", 2), ("E", "b@E", 1)]
    assert all(decode_done(m).error for _, m in sent)  # what the entry's guard takes: its relay resumes at once
    notices = [m for _, m in sent]
    sent.clear()
    server._on_send_failed("E", notices)  # the entry is gone after all: nothing more is sent
    assert sent == [] and len(routed) == 5


def test_only_its_own_submitter_takes_a_running_request_over():
    svc = SubmitService(None)
    svc.running["r"] = (trio.CancelScope(), trio.Event())
    svc.submitters["r"] = "alice"
    msg = {"prompt": "hi", "request_id": "r", "resumed": True}
    assert svc._only_own_take_over(msg, "alice")["resumed"] is True
    assert svc._only_own_take_over(msg, "mallory")["resumed"] is False


def test_a_peer_coming_up_or_missing_a_heartbeat_while_a_proposal_loads_does_not_spoil_it(monkeypatch):
    """With a fault every 8 s, some peer went down or came back every few seconds, the head dropped its proposal
    at every change of the view, no epoch after the first committed, and every request waited (chaos run).
    A proposal is dropped only when a peer it assigns stays down (PROPOSAL_GRACE_S)."""
    from hexswarm.net.identity import generate
    from hexswarm.serve import serving
    from hexswarm.serve.layout import StageAssignment

    replicas = [[StageAssignment("A", 1, 0, 2), StageAssignment("B", 1, 2, 4)]]
    monkeypatch.setattr(serving, "make_layout", lambda cfg, peers, pinned, seed, keep=(): (replicas, {}))
    head = object.__new__(serving.Server)
    view = ["A", "B"]
    gossip = []

    async def noop(*args):
        pass

    async def on_gossip(msg, publisher):
        gossip.append(msg)

    head.__dict__.update(
        me="A", model_id="m", cfg=None, highest_epoch=0, committed=None, _last_proposal=None,
        _ready={}, _proposing=True, serving_view=lambda: list(view),
        head_settings=SimpleNamespace(serve_layout={}, plan_seed=0, ready_timeout_s=60.0, term_s=300.0),
        node=SimpleNamespace(identity=generate()), _peer_views=lambda v: [], _learn_highest_epoch=noop,
        _publish_layout=noop, _on_layout_gossip=on_gossip)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(head._propose, ["A", "B"])
            while 1 not in head._ready:  # planned (in a thread) and published
                await trio.sleep(0.1)
            view.append("C")  # a peer restarted: up again, not in this proposal
            await trio.sleep(1)
            view.remove("B")  # a peer of the proposal missed its heartbeats for a moment (a busy host)
            await trio.sleep(2)
            view.append("B")
            head.mark_ready(1, "A")
            head.mark_ready(1, "B")

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    kinds = [serving.open_sealed(m, serving.LAYOUT_DOMAIN)[0]["type"] for m in gossip]
    assert kinds == ["propose", "commit"]


def test_a_client_keeps_failing_over_an_accepted_request_until_its_timeout():
    """With entries killed and restarted every few seconds, a client whose request was accepted spent its six
    tries in about a minute on entries that were down or restarting, and the request was lost (chaos run)."""
    from hexswarm.errors import UserError
    from hexswarm.net.identity import generate
    from hexswarm.api.client import SwarmClient

    addr = f"/ip4/127.0.0.1/tcp/1/p2p/{generate().peer_id.to_base58()}"
    client = SwarmClient([addr], timeout=240)
    calls = []

    async def submit_once(addr, request, on_frame, timeout=None):
        calls.append(request.get("resumed", False))
        if len(calls) == 1:
            on_frame({"accepted": {"request_id": request["request_id"]}})
            raise UserError("the connection broke")
        if len(calls) < 12:  # every entry down or restarting for a while
            raise UserError("cannot reach")
        return {"done": {"tokens": [7]}}

    client.submit_once = submit_once
    final = trio.run(client.submit, {"prompt": "hi"}, clock=trio.testing.MockClock(autojump_threshold=0))
    assert final == {"done": {"tokens": [7]}}
    assert calls[0] is False and all(calls[1:])  # after acceptance every resubmission is marked resumed


def test_a_client_gives_up_an_unaccepted_request_after_its_tries():
    from hexswarm.errors import UserError
    from hexswarm.net.identity import generate
    from hexswarm.api.client import SwarmClient

    client = SwarmClient([f"/ip4/127.0.0.1/tcp/1/p2p/{generate().peer_id.to_base58()}"], timeout=240)
    calls = []

    async def submit_once(addr, request, on_frame, timeout=None):
        calls.append(1)
        raise UserError("cannot reach")

    client.submit_once = submit_once
    try:
        trio.run(client.submit, {"prompt": "hi"}, clock=trio.testing.MockClock(autojump_threshold=0))
    except UserError as e:
        assert "cannot reach" in str(e)
    assert len(calls) == 6


# ---- a new epoch keeps the stages it repeats loaded (no load, no wait for ready) --------------------------------
def _stage_set(built: list):
    """A StageSet whose workers are stand-ins; `built` collects each (epoch, replica, stage) it loads."""
    import time

    from hexswarm.serve.stages import ServeSettings, StageSet

    class Worker:
        def __init__(self, key):
            self.key, self.error, self.in_flight, self.msgs, self.closed = key, None, 0, [], 0
            self.spec = SimpleNamespace(max_batch=4)
            self.last_message_at = time.monotonic()
            self.spans = {}

        def submit(self, msg):
            self.msgs.append(msg)

        def close(self):
            self.closed += 1

    stages = StageSet("A", SimpleNamespace(vocab_size=100, hidden_size=8), None,
                      ServeSettings(model_dir="unused", retire_idle_s=0.0), pipe=None)

    def build(layout, ri, si):
        built.append((layout.epoch, ri, si))
        return Worker((layout.epoch, ri, si))

    stages._build_worker = build
    return stages


def _route(stages, msg: dict, sender: str) -> bool:
    """`msg` as the pipe hands it on: decoded (checked against the stage it goes to), then routed."""
    from hexswarm.serve.messages import PipelineDecoder

    decoder = PipelineDecoder(stages.cfg, stages.settings.max_seq_len, stages.stage_facts)
    return stages.route(decoder.decode(msg, sender), sender)


def _layouts():
    from hexswarm.serve.layout import StageAssignment, SwarmLayout

    r0 = (StageAssignment("A", 2, 0, 2), StageAssignment("B", 1, 2, 4))
    r1 = (StageAssignment("C", 2, 0, 2), StageAssignment("A", 1, 2, 4))
    r1b = (StageAssignment("C", 2, 0, 2), StageAssignment("D", 1, 2, 4))
    one = SwarmLayout(1, "A", "m", ("A", "B", "C"), (r0, r1))
    two = SwarmLayout(2, "A", "m", ("A", "B", "C", "D"), (r1b, r0), continues=(None, (1, 0)))
    return one, two


def test_a_new_epoch_serves_on_with_the_stages_it_continues():
    """Every epoch loaded every stage again: a TP-2 stage took 25-55 s on the loaded chaos machine, and under a
    fault every 8 s no epoch after the first committed.  A replica the new layout continues keeps its worker;
    the old epoch's requests (same worker) finish on it; it closes once, after both epochs let it go."""
    from hexswarm.serve.layout import SwarmLayout

    one, two = _layouts()
    assert SwarmLayout.from_wire(two.to_wire(), 4) == two  # continues goes over the wire
    built = []
    stages = _stage_set(built)
    trio.run(stages.load_epoch, one)
    trio.run(stages.load_epoch, two)
    assert built == [(1, 0, 0), (1, 1, 1)]  # epoch 2's replica 1 is epoch 1's replica 0: nothing loaded
    shared = stages.workers[(2, 1, 0)]
    assert shared is stages.workers[(1, 0, 0)]
    start = {"kind": "start", "rid": "r", "entry": "E", "attempt": 1, "prompt_ids": [1, 2], "max_new_tokens": 2,
             "params": {}, "to": [2, 1, 0]}
    assert _route(stages, start, "A") and shared.msgs[-1]["rid"] == "r"
    # steps go to the key the worker was built for (its neighbours' workers send there), never to an alias
    tokens = {"kind": "tokens", "to": [1, 0, 0], "steps": [0], "items": []}
    assert _route(stages, tokens, "B")
    assert stages.spans("r") == [] and stages.failed() == []
    # a step to the alias comes from a neighbour whose worker was built for epoch 2 (it loaded afresh): dropped,
    # and the worker reported failed under every key (the chain cannot work; the head re-plans it); a stranger's
    # step to the alias changes nothing
    assert not _route(stages, {**tokens, "to": [2, 1, 0]}, "C") and stages.failed() == []
    assert not _route(stages, {**tokens, "to": [2, 1, 0]}, "B")
    assert stages.failed() == ["1:0:0", "2:1:0"]
    assert sorted(stages.slot_counts()) == ["1:0:0", "1:1:1", "2:1:0"]
    trio.run(stages.retire_older_than, 2)
    assert (1, 0, 0) in stages.workers and (1, 1, 1) not in stages.workers  # still addressed by its chain
    assert shared.closed == 0
    trio.run(stages.retire_older_than, 3)
    assert stages.workers == {} and shared.closed == 1


def test_a_stage_not_loaded_here_any_more_is_loaded_again_instead_of_continued():
    """A peer restarted since the head saw its record (or its worker failed) has nothing to continue with:
    it loads; its neighbours' continued workers send to a key it does not have, so no step meets a cache
    that lacks its context (a dropped step fails over; a wrong token would be delivered)."""
    one, two = _layouts()
    built = []
    stages = _stage_set(built)
    trio.run(stages.load_epoch, one)
    stages.workers[(1, 0, 0)].error = RuntimeError("engine stopped")
    trio.run(stages.load_epoch, two)
    assert (2, 1, 0) in built and stages.workers[(2, 1, 0)] is not stages.workers[(1, 0, 0)]
    # its neighbour (B) continues the worker it built for epoch 1 and sends there: the fresh stage can never meet
    # it, so it is reported failed at once (the head re-plans; a chaos run's replica stalled every request for
    # minutes, the head placing on it over and over)
    assert "2:1:0" in stages.failed()
    # a replica whose every stage is on this peer, all loaded afresh, is whole: not reported
    from hexswarm.serve.layout import StageAssignment, SwarmLayout

    solo1 = SwarmLayout(3, "A", "m", ("A",), ((StageAssignment("A", 1, 0, 4),),))
    solo2 = SwarmLayout(4, "A", "m", ("A",), ((StageAssignment("A", 1, 0, 4),),), continues=((3, 0),))
    stages = _stage_set([])
    trio.run(stages.load_epoch, solo1)
    stages.workers[(3, 0, 0)].error = RuntimeError("engine stopped")
    trio.run(stages.load_epoch, solo2)
    assert stages.failed() == ["3:0:0"]


def test_a_superseded_proposal_is_not_loaded_but_its_commit_is():
    """Under churn a restarted TP-2 peer loaded four proposals one after the other (~90 s each on the loaded
    machine) that newer ones had superseded, before the one that committed: stages of a proposal are not loaded
    once a newer epoch is known; if that proposal commits after all, its commit loads them."""
    one, _ = _layouts()
    built = []
    stages = _stage_set(built)
    assert trio.run(lambda: stages.load_epoch(one, superseded=lambda: True)) is False
    assert built == [] and stages.workers == {}
    assert trio.run(stages.load_epoch, one) is True
    assert built == [(1, 0, 0), (1, 1, 1)]


def test_the_head_places_only_on_replicas_whose_stages_are_loaded():
    """A peer that restarted after the commit is up before it has loaded its stages again: the head placed
    requests there and stage 0 refused them "not served" (24 times in a 2-minute chaos run, a placement each)."""
    from hexswarm.serve import serving

    one, _ = _layouts()
    head = object.__new__(serving.Server)
    slots = {"A": {"1:0:0": 4, "1:1:1": 4}, "B": {"1:0:1": 4}, "C": {}}  # C restarted: loading epoch 1 again
    head.__dict__.update(
        me="A", serving_view=lambda: ["A", "B", "C"], failed_here=lambda: [],
        stages=SimpleNamespace(slot_counts=lambda: slots["A"]),
        node=SimpleNamespace(table=SimpleNamespace(get=lambda p: SimpleNamespace(
            record=SimpleNamespace(extra={"slots": slots.get(p, {}), "failed": []})))))
    assert head.healthy_replicas(one) == [0]
    slots["C"] = {"1:1:0": 4}
    assert head.healthy_replicas(one) == [0, 1]


def test_the_pinned_planner_keeps_the_replicas_that_survived():
    """After a fault the pinned planner reshuffled the surviving peers (best fit by id), so even the replica
    that lost nothing was loaded again; it is kept as it was, and the head marks it continued."""
    from hexswarm.model.config import LlamaConfig
    from hexswarm.model.tiny import make_tiny_llama
    from hexswarm.serve.planning import PeerView, pinned_layout

    import tempfile
    from pathlib import Path

    cfg = LlamaConfig.from_dir(make_tiny_llama(Path(tempfile.mkdtemp()) / "m"))
    cpu = {"kind": "cpu", "name": "cpu", "memory_gib": 4}
    peers = {name: PeerView(name, [cpu] * n, {}) for name, n in (("a2", 2), ("b1", 1), ("c2", 2), ("d1", 1))}
    shape = {"hetero_config": [2, 1], "pp_partition": [2, 2], "replicas": 2}
    first = pinned_layout(cfg, list(peers.values()), shape)
    survivor = next(r for r in first if "b1" not in {s.peer for s in r})
    after = pinned_layout(cfg, [p for n, p in peers.items() if n != "b1"], shape, keep=[survivor])
    assert after == [survivor]
    back = pinned_layout(cfg, list(peers.values()), shape, keep=after)
    assert back[0] == survivor and len(back) == 2


def test_the_head_marks_continued_only_replicas_whose_stages_every_peer_has_loaded():
    from hexswarm.serve import serving

    one, two = _layouts()
    head = object.__new__(serving.Server)
    slots = {"A": {"1:0:0": 4, "1:1:1": 4}, "B": {"1:0:1": 4}, "C": {}}  # C restarted: epoch 1 not loaded
    head.__dict__.update(
        me="A", serving_view=lambda: ["A", "B", "C", "D"], failed_here=lambda: [],
        stages=SimpleNamespace(slot_counts=lambda: slots["A"]),
        node=SimpleNamespace(table=SimpleNamespace(get=lambda p: SimpleNamespace(
            record=SimpleNamespace(extra={"slots": slots.get(p, {}), "failed": []})))))
    assert head._continuations([one], two.replicas) == (None, (1, 0))
    slots["B"] = {}
    assert head._continuations([one], two.replicas) == ()


def test_a_pipeline_peer_missing_heartbeats_for_a_moment_is_not_lost_but_a_restarted_one_is():
    """Under load ~16 peers missed heartbeats for a second or two all the time; each miss cancelled and re-placed
    every request on them (one request: 15 placements, ~6 tokens each, lost at the deadline; chaos run
    2026-11-26).  A peer counts as lost once silent PEER_LOST_GRACE_S past down_after_s, or at once when it
    restarted (a new incarnation: its stages, and the request's state on them, are gone)."""
    from hexswarm.swarm.peer_table import PeerTable
    from hexswarm.serve.submit import PEER_LOST_GRACE_S

    now = [0.0]
    table = PeerTable(2.0, 60.0, clock=lambda: now[0])

    def record(incarnation):
        return SimpleNamespace(peer_id="s1", incarnation=incarnation, order=(incarnation, int(now[0] * 10)))

    table.observe(record(1))
    server = SimpleNamespace(me="s0", node=SimpleNamespace(table=table, config=SimpleNamespace(down_after_s=2.0)),
                             committed=None)
    svc = SubmitService(None)
    svc.port = port_of(server)
    placement = {"epoch": 1, "replica": 0, "stages": [{"peer": "s0"}, {"peer": "s1"}]}
    seen: dict = {}
    assert svc._pipeline_alive(placement, seen)
    now[0] = 3.5
    table.sweep()  # down: silent > 2 s
    assert svc._pipeline_alive(placement, seen)
    now[0] = 2.0 + PEER_LOST_GRACE_S + 0.5
    assert svc._pipeline_alive(placement, seen, quiet_s=1.0)  # its tokens still come: every stage is alive
    assert not svc._pipeline_alive(placement, seen)
    table.observe(record(2))  # back, restarted
    assert not svc._pipeline_alive(placement, seen)
    assert svc._pipeline_alive(placement, {})  # a new placement on it is fine


def test_the_head_re_plans_a_peer_out_only_once_it_stayed_down(monkeypatch):
    """Each missed heartbeat of a busy peer made the head plan its replicas out after settle_s (1 s), and load
    them again when it came back a second later (chaos run, load ~16): a view that lost a peer holds
    PROPOSAL_GRACE_S first (requests meanwhile go to the committed layout's healthy replicas)."""
    from hexswarm.serve import serving

    import time

    monkeypatch.setattr(serving, "time", SimpleNamespace(monotonic=trio.current_time, time=time.time))
    one, _ = _layouts()
    head = object.__new__(serving.Server)
    view = ["A", "B", "C"]
    proposed = []

    async def propose(v):
        proposed.append((trio.current_time(), list(v)))  # and stays "proposing"

    head.__dict__.update(
        me="A", committed=one, _view_seen=None, _proposing=False, _commit_msg=None, serving_view=lambda: list(view),
        current_head=lambda v=None: "A", failed_replicas=lambda layout: set(), _propose=propose,
        head_settings=SimpleNamespace(settle_s=1.0))

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(head._head_loop, nursery)
            view.remove("B")  # missed heartbeats for 2 s
            await trio.sleep(2)
            view.append("B")
            view.sort()
            await trio.sleep(10)
            assert proposed == []
            view.remove("C")  # stays down
            await trio.sleep(10)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [v for _, v in proposed] == [["A", "B"]]
    assert proposed[0][0] >= 12 + serving.PROPOSAL_GRACE_S


def test_a_placement_waiting_for_a_pipeline_takes_it_when_its_peer_is_back_up():
    """The head's dispatch waited for a live pipeline only on a new commit: a replica whose peer missed heartbeats
    for a moment stayed unused until the 30-s wait ran out ("no live pipeline in epoch N after 30 s", the most
    common refusal of the chaos runs) although it was back up within seconds."""
    from hexswarm.serve import serving

    one, _ = _layouts()
    head = object.__new__(serving.Server)
    back_at = 2.0
    sent = []
    head.__dict__.update(
        me="A", committed=one, current_head=lambda v=None: "A", _layout_changed=trio.Event(),
        healthy_replicas=lambda layout: [0] if trio.current_time() >= back_at else [],
        head_settings=SimpleNamespace(dispatch_wait_s=30.0), settings=SimpleNamespace(max_batch=8),
        replica_slots=lambda layout, r: 8, replica_load=lambda layout, r: 0, recent_dispatch={},
        pipe=SimpleNamespace(send=lambda peer, msg: sent.append(peer)))
    msg = {"rid": "r", "prompt_ids": [1], "params": {}, "max_new_tokens": 1, "stop": [], "entry": "E", "attempt": 1}

    async def main():
        placed = await head.dispatch(msg)
        assert trio.current_time() < back_at + 1
        return placed

    placed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert placed["replica"] == 0 and sent == ["A"]


def test_a_step_that_never_came_back_hands_its_requests_back_to_their_entries():
    """A step lost for STEP_EXPIRY_S (its later stage died) that held a request's last prefill chunk left the
    request "prefilled" with no token to decode: the stage-0 engine died in _schedule (IndexError, chaos run under
    load), taking its replica out.  Now the request ends here with an error and its entry resumes it (exactly
    once, from the tokens it has), and the engine goes on."""
    import time

    from hexswarm.runtime import stage_engine as se

    sent = []
    spec = SimpleNamespace(max_batch=2, max_seq_len=64, device="cpu", device_of=lambda i: "cpu")
    host = SimpleNamespace(spec=spec, executor=SimpleNamespace(kv=SimpleNamespace(n_blocks=8)))
    engine = se.StageEngine(host, se.PipelineRoute(0, 2, "B", "A"), lambda peer, msg: sent.append((peer, msg)))
    engine._start({"kind": "start", "rid": "r", "entry": "E", "attempt": 1, "prompt_ids": [1, 2, 3],
                   "max_new_tokens": 4, "params": {}, "resume_tokens": []})
    engine._handle_first([])  # admitted
    req = engine.requests["r"]
    rows = engine._schedule()
    assert [(r.start, r.n, r.samples) for r in rows] == [(0, 3, True)]
    req.in_flight, req.pending, req.prefilled, req.prefill_done = 1, 1, 3, True  # as _step leaves it
    engine._steps[0] = se.InFlight(time.monotonic() - se.STEP_EXPIRY_S - 1, [req])
    engine._expire_steps()
    assert engine._schedule() == [] and "r" not in engine.requests
    assert [(peer, m["kind"], m["rid"], m["attempt"]) for peer, m in sent] == [("E", "done", "r", 1)]
    assert "no tokens for a step" in sent[0][1]["error"]
    assert engine.kv_committed == 0 and engine.free_slots == [1, 0]  # its slot and KV blocks are free again


def test_stage_0_takes_a_start_from_a_head_that_missed_heartbeats_here():
    """Stage 0 refused starts from a head it saw down for a moment ("not a head candidate"): each such request
    stalled 60 s (chaos run, load ~14).  A head-capable peer in the table counts, up or not; others do not."""
    from collections import OrderedDict

    import pytest

    from hexswarm.errors import ProtocolError
    from hexswarm.serve import serving
    from hexswarm.swarm.peer_table import PeerTable

    now = [0.0]
    table = PeerTable(2.0, 60.0, clock=lambda: now[0])
    for peer, serve in (("H", True), ("W", False)):
        table.observe(SimpleNamespace(peer_id=peer, order=(1, 1), roles=[], extra={"model": "m", "serve": serve}))
    now[0] = 3.0
    table.sweep()  # both down here
    stage0 = object.__new__(serving.Server)
    stage0.__dict__.update(me="S", model_id="m", _start_attempts=OrderedDict(),
                           node=SimpleNamespace(table=table, config=SimpleNamespace(roles=[])))
    stage0._check_start("E", "r", 1, "H")
    with pytest.raises(ProtocolError):
        stage0._check_start("E", "r2", 1, "W")


def test_a_head_gives_up_a_proposal_whose_epoch_the_swarm_already_passed(monkeypatch):
    """A restarted head that could not ask its view for the newest epoch (load) proposed epoch 1 while the others
    were at 2: they ignored it, and it waited the 120-s ready timeout with no new epoch possible (chaos run)."""
    from hexswarm.net.identity import generate
    from hexswarm.serve import serving
    from hexswarm.serve.layout import StageAssignment

    replicas = [[StageAssignment("A", 1, 0, 2), StageAssignment("B", 1, 2, 4)]]
    monkeypatch.setattr(serving, "make_layout", lambda cfg, peers, pinned, seed, keep=(): (replicas, {}))
    head = object.__new__(serving.Server)

    async def noop(*args):
        pass

    head.__dict__.update(
        me="A", model_id="m", cfg=None, highest_epoch=0, committed=None, _last_proposal=None, _ready={},
        _proposing=True, serving_view=lambda: ["A", "B"], node=SimpleNamespace(identity=generate()),
        head_settings=SimpleNamespace(serve_layout={}, plan_seed=0, ready_timeout_s=120.0, term_s=300.0),
        _peer_views=lambda v: [], _learn_highest_epoch=noop, _publish_layout=noop, _on_layout_gossip=noop)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(head._propose, ["A", "B"])
            while 1 not in head._ready:
                await trio.sleep(0.1)
            head.highest_epoch = 2  # a commit of epoch 2 came in
            await trio.sleep(1)
            assert not head._proposing  # given up, free to propose epoch 3

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_waiting_relay_hands_on_its_next_token_in_place_and_anything_else_in_order():
    """RelayInbox: while the relay task waits, the current attempt's next token from its stage 0 goes to the
    front end's `put` from the delivering call (no task switch per token); any other message (an intruder's, a
    token out of order, the done) and everything after it go through the task, in the order they came."""
    import math

    from hexswarm.serve.submit import RelayInbox

    svc = _service(FakeEntryServer())
    send, receive = trio.open_memory_channel(math.inf)
    inbox = RelayInbox(send)
    out: list[tuple[str, dict]] = []

    async def emit(frame):
        out.append(("task", frame))

    def put(frame):
        out.append(("in place", frame))

    req = {"rid": "r", "stream": True, "max_new_tokens": 8, "placed": 1}
    placement = {"epoch": 1, "replica": 0, "attempt": 1, "stages": [{"peer": "s0", "tp": 1, "layers": [0, 4]}]}

    def ev(i, sender="s0"):
        return {"kind": "event", "rid": "r", "attempt": 1, "index": i, "token": 100 + i, "_sender": sender}

    async def main():
        result = []

        async def relay():
            result.append(await svc._relay(emit, req, placement, receive, trio.current_time() + 600, False,
                                           inbox, put))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay)
            await trio.testing.wait_all_tasks_blocked()
            inbox.send_nowait(ev(0))
            inbox.send_nowait(ev(1))
            assert out == [("in place", {"token": 100, "index": 0}), ("in place", {"token": 101, "index": 1})]
            inbox.send_nowait(ev(2, sender="intruder"))  # not stage 0's: the task's to judge (it drops it) ...
            assert inbox.take is None
            inbox.send_nowait(ev(2))  # ... and the tokens after it queue behind it
            inbox.send_nowait(ev(3))
            assert len(out) == 2
            await trio.testing.wait_all_tasks_blocked()
            assert result == [] and [how for how, _ in out] == ["in place", "in place", "task"]
            assert [f["token"] for f in out[2][1]["batch"]] == [102, 103]  # the task took both in one batch
            assert inbox.take is not None  # waiting again
            inbox.send_nowait(ev(4))
            inbox.send_nowait({"kind": "done", "rid": "r", "attempt": 1, "_sender": "s0", "prompt_tokens": [1],
                               "tokens": [100, 101, 102, 103, 104, 105], "text": "x", "finish_reason": "length",
                               "timings": {}})
        assert out[3] == ("in place", {"token": 104, "index": 4})
        assert out[4] == ("task", {"token": 105, "index": 5})  # its event never came: the done's tokens go first
        assert result[0]["done"]["tokens"] == [100, 101, 102, 103, 104, 105]

    trio.run(main, clock=trio.testing.MockClock())

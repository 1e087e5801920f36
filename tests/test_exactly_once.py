"""Exactly-once failover at the entry (issue 13's chaos run): causes of lost requests, each kept as a test."""

from __future__ import annotations

from types import SimpleNamespace

import trio
import trio.testing

from hexswarm.swarm.submit import SubmitService


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


def test_every_resume_of_a_request_takes_a_newer_attempt():
    """Stage 0 refuses a start whose attempt is not newer than the last it saw for (entry, rid); resumes that
    all carried attempt 2 were refused there, stalled 60 s each and were lost (chaos run, 2026-11-25)."""
    server = FakeHeadServer()
    svc = SubmitService(server=None)
    svc.server = server
    req = {"rid": "r", "prompt_ids": [1, 2], "params": {}, "max_new_tokens": 8, "stop": []}

    async def main():
        await svc.place(req)
        deadline = trio.current_time() + 10
        await svc._resume(req, [5], deadline)
        await svc._resume(req, [5, 6], deadline)

    trio.run(main)
    assert [s["attempt"] for s in server.starts] == [1, 2, 3]
    assert [s["resume_tokens"] for s in server.starts] == [[], [5], [5, 6]]


def test_tries_the_head_refuses_do_not_use_up_a_request_s_pipelines():
    """While no layout could be formed, each resume try (refused `no_layout` by the head) took an attempt
    number, and a request that then lost one more pipeline ended "failed on 17 pipelines" having run on 3
    (chaos run, 2026-11-25): only placements count towards MAX_ATTEMPTS."""
    from hexswarm.net.protocols import RemoteError
    from hexswarm.swarm.submit import MAX_ATTEMPTS

    server = FakeHeadServer()
    server.serving_view = lambda: ["s0"]
    server.committed = None
    send, receive = trio.open_memory_channel(100)
    svc = SubmitService(server=None)
    svc.server = server
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
        return await svc._relay(None, req, placement, receive)

    final = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert "done" in final, final
    assert len(placed) == 3 and placed[-1] > MAX_ATTEMPTS

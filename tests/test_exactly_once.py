"""Exactly-once failover at the entry (issue 13's chaos run): causes of lost requests, each kept as a test."""

from __future__ import annotations

from types import SimpleNamespace

import trio

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
                "stages": [{"peer": "s0"}]}


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

"""`/hexswarm/submit/3` (serve/submit_session.py): one stream per client and entry carries all the client's
requests.  Real libp2p hosts on 127.0.0.1 in one process; the entry's serving is a stand-in `serve_peer` (the node's
own is SubmitService's, run by the swarm tests), so each test controls what a request does."""

from __future__ import annotations

import multiaddr
import pytest
import trio

from hexswarm.net import identity
from hexswarm.net.framing import read_frame, write_frame
from hexswarm.net.host import make_host, parse_peer_id
from hexswarm.net.protocols import SUBMIT3
from hexswarm.net.ratelimit import PeerSlots
from hexswarm.serve.submit_session import on_session_stream

LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


def _addr(host) -> str:
    return f"{host.get_addrs()[0]}/p2p/{host.get_id().to_base58()}"


class Entry:
    """A stand-in for SubmitService as a session sees it: `serve_peer` runs `behaviour(msg, put)`."""

    def __init__(self, behaviour, per_peer: int = 64):
        self.behaviour = behaviour
        self.open_streams = PeerSlots(per_peer)
        self.sessions = 0
        self.seen: list[dict] = []

    async def serve_peer(self, peer: str, msg, put) -> dict:
        self.seen.append(msg)
        return await self.behaviour(msg, put)

    def handler(self, sessions: PeerSlots | None = None):
        async def on_stream(stream):
            self.sessions += 1
            await on_session_stream(self, sessions or PeerSlots(8), stream)
        return on_stream


async def _tokens(msg: dict, put, first: int = 0) -> dict:
    """accepted, then tokens first..max_new_tokens-1 (token = 100 * the prompt's length + index), then done."""
    put({"accepted": {"request_id": msg["request_id"]}})
    base = 100 * len(msg["prompt"])
    for i in range(first, msg["max_new_tokens"]):
        await trio.sleep(0.01)
        put({"token": base + i, "index": i})
    return {"done": {"tokens": [base + i for i in range(msg["max_new_tokens"])]}}


def _held(stopped: trio.Event):
    """A request that is accepted and then runs until cancelled, setting `stopped` when its work ends."""
    async def behaviour(msg, put):
        put({"accepted": {"request_id": msg.get("request_id")}})
        try:
            await trio.sleep_forever()
        finally:
            stopped.set()
    return behaviour


def _raw_session(entry: Entry, frames: list, then):
    """Open a session to `entry` from a bare host, write `frames` on it, and return `await then(stream)`."""
    async def main():
        host, attacker = make_host(identity.generate()), make_host(identity.generate())
        async with host.run(LISTEN), attacker.run(LISTEN):
            host.set_stream_handler(SUBMIT3, entry.handler())
            await attacker.connect(_info(host))
            stream = await attacker.new_stream(host.get_id(), [SUBMIT3])
            for frame in frames:
                await write_frame(stream, frame)
            return await then(stream)
    return trio.run(main)


def test_concurrent_requests_share_one_session_and_each_gets_its_own_frames_in_order():
    from hexswarm.api.client import SwarmClient

    entry = Entry(_tokens)

    async def main():
        host = make_host(identity.generate())
        async with host.run(LISTEN):
            host.set_stream_handler(SUBMIT3, entry.handler())
            got: dict[int, list] = {}
            finals: dict[int, dict] = {}
            async with SwarmClient([_addr(host)], timeout=30) as client:
                async def one(k: int):
                    got[k] = []
                    finals[k] = await client.submit({"prompt": "x" * k, "max_new_tokens": 3 + k}, got[k].append)
                async with trio.open_nursery() as nursery:
                    for k in range(1, 7):
                        nursery.start_soon(one, k)
            return got, finals

    got, finals = trio.run(main)
    assert entry.sessions == 1  # six requests, one stream
    for k in range(1, 7):
        want = [100 * k + i for i in range(3 + k)]
        assert [f["token"] for f in got[k] if "token" in f] == want
        assert [f["index"] for f in got[k] if "token" in f] == list(range(3 + k))
        assert "accepted" in got[k][0] and finals[k] == {"done": {"tokens": want}}


def test_a_request_its_caller_gives_up_on_stops_at_the_entry_and_the_session_goes_on():
    from hexswarm.api.client import SwarmClient

    stopped = trio.Event()
    held = _held(stopped)

    async def forever(msg, put):
        return await (_tokens(msg, put) if msg["prompt"] == "quick" else held(msg, put))

    entry = Entry(forever)

    async def main():
        host = make_host(identity.generate())
        async with host.run(LISTEN):
            host.set_stream_handler(SUBMIT3, entry.handler())
            async with SwarmClient([_addr(host)], timeout=30) as client:
                with trio.move_on_after(0.5):
                    await client.submit_once(_addr(host), {"prompt": "slow", "request_id": "a"})
                with trio.fail_after(5):
                    await stopped.wait()  # the cancel reached the entry and its work stopped
                return await client.submit({"prompt": "quick", "max_new_tokens": 2})

    final = trio.run(main)
    assert final == {"done": {"tokens": [500, 501]}}
    assert entry.sessions == 1


@pytest.mark.parametrize("bad", [["not", "a", "map"], {"bogus": 1}, {"submit": "one"}, {"submit": -1},
                                 {"submit": True}, {"cancel": 1.5}, {"submit": 2 ** 63}])
def test_a_malformed_session_message_gets_one_error_and_ends_the_session(bad):
    async def then(stream):
        reply = await read_frame(stream, timeout=5)
        with pytest.raises(Exception):  # then the entry closes it
            await read_frame(stream, timeout=5)
        return reply

    reply = _raw_session(Entry(_tokens), [bad], then)
    assert reply["error"]["code"] == "bad_request"
    assert "\n" not in reply["error"]["message"]


def test_a_request_number_already_running_ends_the_session_and_its_requests():
    stopped = trio.Event()

    async def then(stream):
        reply = await read_frame(stream, timeout=5)
        while "n" in reply:  # the first request's accepted frame may come first
            reply = await read_frame(stream, timeout=5)
        with trio.fail_after(5):
            await stopped.wait()
        return reply

    reply = _raw_session(Entry(_held(stopped)), [{"submit": 3, "msg": {"prompt": "a"}},
                                                 {"submit": 3, "msg": {"prompt": "b"}}], then)
    assert reply["error"]["code"] == "bad_request" and "already running" in reply["error"]["message"]


def test_the_per_peer_bound_on_open_requests_holds_on_a_session():
    from hexswarm.api.client import SwarmClient

    release = trio.Event()

    async def held(msg, put):
        put({"accepted": {"request_id": msg["request_id"]}})
        await release.wait()
        return {"done": {"tokens": []}}

    entry = Entry(held, per_peer=2)

    async def main():
        host = make_host(identity.generate())
        async with host.run(LISTEN):
            host.set_stream_handler(SUBMIT3, entry.handler())
            finals = []
            async with SwarmClient([_addr(host)], timeout=30) as client:
                async def one():
                    finals.append(await client.submit_once(_addr(host), {"prompt": "p", "request_id": "r"}))
                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(one)
                    with trio.fail_after(5):
                        while not finals:  # the third is refused at once, the other two held
                            await trio.sleep(0.01)
                    release.set()
            return finals

    finals = trio.run(main)
    assert finals[0]["error"]["code"] == "busy"
    assert sorted(map(str, finals[1:])) == [str({"done": {"tokens": []}})] * 2


def test_a_slow_request_stays_on_its_session_while_the_entry_sends_keepalives():
    """Nothing but keepalives for 5 s (more than the client's silence limit of 3 s): no failover."""
    from hexswarm.api.client import SwarmClient

    async def slow(msg, put):
        await trio.sleep(5)
        return {"done": {"tokens": [1]}}

    entry = Entry(slow)

    async def main():
        host = make_host(identity.generate())
        async with host.run(LISTEN):
            host.set_stream_handler(SUBMIT3, entry.handler())
            frames = []
            async with SwarmClient([_addr(host)], timeout=60, silent_s=3) as client:
                final = await client.submit({"prompt": "hi", "max_new_tokens": 1}, frames.append)
            return final, frames

    final, frames = trio.run(main)
    assert final == {"done": {"tokens": [1]}}
    assert len(entry.seen) == 1 and frames == [final]  # keepalives are the session's, not the caller's


def test_a_session_that_goes_silent_fails_its_requests_over_with_every_token_once():
    """Entry A accepts on its session, sends two tokens and freezes; the client resubmits through entry B marked
    resumed with the tokens it has, within its silence limit (an entry that speaks only submit/2, the fallback, is
    test_entry_failover's)."""
    from hexswarm.api.client import SwarmClient

    async def entry_a(stream):
        msg = await read_frame(stream)
        n, rid = msg["submit"], msg["msg"]["request_id"]
        await write_frame(stream, {"n": n, "frame": {"accepted": {"request_id": rid}}})
        for i in range(2):
            await write_frame(stream, {"n": n, "frame": {"token": 10 + i, "index": i}})
        await trio.sleep(30)  # frozen: the client's reset ends this

    async def resume(msg, put):  # B continues after the tokens the client has
        put({"accepted": {"request_id": msg["request_id"]}})
        put({"batch": [{"token": 10 + i, "index": i} for i in range(len(msg["resume_tokens"]), 4)]})
        return {"done": {"tokens": [10, 11, 12, 13]}}

    entry_b = Entry(resume)

    async def main():
        a, b = make_host(identity.generate()), make_host(identity.generate())
        async with a.run(LISTEN), b.run(LISTEN):
            a.set_stream_handler(SUBMIT3, entry_a)
            b.set_stream_handler(SUBMIT3, entry_b.handler())
            frames: list[dict] = []
            async with SwarmClient([_addr(a), _addr(b)], timeout=60, silent_s=1.5) as client:
                t0 = trio.current_time()
                final = await client.submit({"prompt": "hi", "seed": 7, "request_id": "r", "max_new_tokens": 4},
                                            frames.append)
                took = trio.current_time() - t0
                assert _addr(a) not in client.sessions  # the lost session is forgotten: the next one is new
        return final, took, frames

    final, took, frames = trio.run(main)
    assert final == {"done": {"tokens": [10, 11, 12, 13]}} and took < 10
    assert [(f["index"], f["token"]) for f in frames if "token" in f] == [(0, 10), (1, 11), (2, 12), (3, 13)]
    (again,) = entry_b.seen
    assert again["resumed"] is True and again["resume_tokens"] == [10, 11] and again["seed"] == 7


def _info(host):
    from libp2p.peer.peerinfo import PeerInfo

    return PeerInfo(parse_peer_id(host.get_id().to_base58()), host.get_addrs())


def test_sessions_per_peer_are_bounded():
    entry = Entry(_tokens)

    async def main():
        host, attacker = make_host(identity.generate()), make_host(identity.generate())
        async with host.run(LISTEN), attacker.run(LISTEN):
            host.set_stream_handler(SUBMIT3, entry.handler(PeerSlots(2)))
            await attacker.connect(_info(host))
            answers = []
            for i in range(3):  # held open: the third is refused (reset at once, or during negotiation)
                try:
                    s = await attacker.new_stream(host.get_id(), [SUBMIT3])
                    await write_frame(s, {"submit": 0, "msg": {"prompt": "x", "request_id": f"r{i}",
                                                               "max_new_tokens": 1}})
                    answers.append(await read_frame(s, timeout=5))
                except Exception:
                    answers.append(None)
            return answers

    answers = trio.run(main)
    assert [a is not None and a.get("n") == 0 for a in answers] == [True, True, False]



def test_an_entry_without_sessions_gets_a_submit2_stream_per_request():
    """An older entry refuses submit/3 at negotiation: the client serves its requests over submit/2 streams."""
    from hexswarm.net.protocols import SUBMIT2
    from hexswarm.api.client import SwarmClient

    streams = []

    async def old_entry(stream):
        msg = await read_frame(stream)
        streams.append(msg["request_id"])
        await write_frame(stream, {"accepted": {"request_id": msg["request_id"]}})
        await write_frame(stream, {"done": {"tokens": [len(streams)]}})

    async def main():
        host = make_host(identity.generate())
        async with host.run(LISTEN):
            host.set_stream_handler(SUBMIT2, old_entry)
            async with SwarmClient([_addr(host)], timeout=30) as client:
                finals = [await client.submit({"prompt": "p", "request_id": f"r{i}"}) for i in range(2)]
                return finals, dict(client.sessions), set(client._no_session)

    finals, sessions, refused = trio.run(main)
    assert finals == [{"done": {"tokens": [1]}}, {"done": {"tokens": [2]}}] and streams == ["r0", "r1"]
    assert sessions == {} and len(refused) == 1


def test_the_entry_sends_keepalives_only_while_a_session_has_requests():
    from types import SimpleNamespace

    import trio.testing

    from hexswarm.serve.submit import KEEPALIVE_S
    from hexswarm.serve.submit_session import EntrySession

    async def main():
        session = EntrySession(None, None, "peer")
        sent: list[float] = []
        session.writer = SimpleNamespace(put=lambda msg: sent.append(trio.current_time()))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session._keep_alive)
            await trio.sleep(5 * KEEPALIVE_S)  # idle: nothing
            idle = len(sent)
            session.scopes[0] = trio.CancelScope()
            await trio.sleep(5 * KEEPALIVE_S)  # a request runs: one keepalive per silent interval
            busy = list(sent)
            nursery.cancel_scope.cancel()
        return idle, busy

    idle, busy = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert idle == 0
    assert 4 <= len(busy) <= 6 and all(b - a >= KEEPALIVE_S - 1e-9 for a, b in zip(busy, busy[1:]))

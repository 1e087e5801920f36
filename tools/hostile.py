"""The hostile sender: schema-aware garbage for every hexswarm protocol, sent by a real libp2p peer.

For each protocol (submit, dispatch, layout, ready, status, peers, trace, ping, direct offers), each
pipe message kind (start, forward, tokens, cancel, events, done) over the libp2p pipe and the direct
path, and each gossip topic (inventory records, layout messages), it starts from a well-formed
message and applies mutations: a field replaced by a value of another type, a non-finite or huge
number, a field dropped, a field added, the whole message replaced.  Signed gossip is re-signed
after the mutation, so the receiver's checks behind the signature are reached too.

Two drivers share it: tests/test_fuzz_swarm.py (hypothesis draws the mutations) and tools/chaos.py
(a seeded RNG draws them, beside the kills).  `Hostile.send` reports what came back; a reply with
the `internal` code, or none within REPLY_TIMEOUT_S (SUBMIT1_REPLY_TIMEOUT_S on submit/1), is a finding.  Traffic stays on loopback.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import trio

from hexswarm.errors import ProtocolError
from hexswarm.net import codec
from hexswarm.net.error_codes import ErrorCode
from hexswarm.net.framing import read_frame, write_frame
from hexswarm.net.protocols import (
    DIRECT, DISPATCH, LAYOUT, PEERS, PING, PIPE, STATUS, SUBMIT, SUBMIT2, SUBMIT3, TRACE, WEIGHTS, reset_quietly,
)

# longer than a node's own read timeout (10 s): silence past it is a hang, not a slow loaded machine
REPLY_TIMEOUT_S = 20.0
# submit/1 has no keepalives: a valid request that waits for a layout hears nothing until the node gives up on it
# (`dispatch_wait_s`, 30 s by default: "no committed layout after 30 s"); three such waits were the only
# unanswered messages of two five-minute chaos runs (BENCHMARKS run 23)
SUBMIT1_REPLY_TIMEOUT_S = 45.0

# values of every type the codec carries, edge numbers first; ints stay inside msgpack's range
WRONG_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, -(2**31) - 1, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1,
    math.inf, -math.inf, math.nan, 1e308, -1e308, 5e-324, -0.0, 0.5,
    "", "x", "0", "inf", "x" * 5000, b"", b"\x00" * 33, [], [None], [1, 2, 3], [[0, 0, 0]] * 3, [math.inf] * 3,
    {}, {"a": 1}, {"kind": "start"}, torch.zeros(2, 3), torch.zeros(1, 64, dtype=torch.int64),
    torch.full((1, 64), math.nan),
]
ACTIONS = ("replace", "drop", "extra", "whole")


# ---- mutations -----------------------------------------------------------------------------
def _locations(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path inside nested dicts and lists."""
    out: list[tuple] = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out += _locations(v, prefix + (k,))
    return out


def _at(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def mutate(template: Any, ops: list[tuple[int, str, Any]]) -> Any:
    """`template` with each (where, action, value) applied in turn; `where` picks a location
    (modulo how many there are), so any integer is a valid choice."""
    msg = copy.deepcopy(template)
    for where, action, value in ops:
        if action == "whole":
            msg = copy.deepcopy(value)
            continue
        locs = _locations(msg)
        if action == "extra" or not locs:
            holders = [()] + [p for p in locs if isinstance(_at(msg, p), (dict, list))]
            holder = _at(msg, holders[where % len(holders)]) if isinstance(msg, (dict, list)) else None
            if isinstance(holder, dict):
                holder[f"extra{where % 7}"] = copy.deepcopy(value)
            elif isinstance(holder, list):
                holder.append(copy.deepcopy(value))
            continue
        path = locs[where % len(locs)]
        parent = _at(msg, path[:-1])
        if action == "drop":
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(value)
    return msg


def random_ops(rng: random.Random, n_max: int = 3) -> list[tuple[int, str, Any]]:
    """Mutations drawn by a seeded RNG (the chaos run's driver; the tests draw them with hypothesis)."""
    def value() -> Any:
        r = rng.random()
        if r < 0.7:
            return rng.choice(WRONG_VALUES)
        if r < 0.85:
            return rng.randint(-(2**63), 2**64 - 1)
        return rng.uniform(-1e300, 1e300)

    return [(rng.randrange(1 << 20), rng.choice(ACTIONS[:3]) if rng.random() > 0.05 else "whole", value())
            for _ in range(rng.randint(1, n_max))]


# ---- well-formed messages -----------------------------------------------------------------
@dataclass
class Target:
    """What the attacker knows of the swarm: a committed epoch and its first replica's peers."""
    epoch: int
    stage_peers: list[str]  # replica 0, stage by stage
    hidden: int
    me: str  # the attacker's PeerID
    model: str = "0" * 16  # the model fingerprint

    @classmethod
    def from_status(cls, status: dict, hidden: int, me: str) -> "Target":
        layout = status["layout"]
        return cls(layout["epoch"], [s["peer"] for s in layout["replicas"][0]], hidden, me, layout["model"])


def pipe_templates(t: Target) -> dict[str, dict]:
    e, last = t.epoch, len(t.stage_peers) - 1
    params = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}
    return {
        "start": {"kind": "start", "to": [e, 0, 0], "rid": "hostile-1", "prompt_ids": [1, 2, 3], "params": params,
                  "max_new_tokens": 4, "stop": [], "entry": t.me, "attempt": 1, "resume_tokens": []},
        "forward": {"kind": "forward", "to": [e, 0, max(1, last)], "steps": [0], "rids": ["hostile-1"],
                    "rows": [[0, 0, 1]], "samples": [{"params": params, "step": 0, "attempt": 1}],
                    "x": torch.zeros(1, t.hidden), "t": [0.0], "sent_at": 0.0},
        "tokens": {"kind": "tokens", "to": [e, 0, 0], "steps": [0], "t": [0.0],
                   "items": [{"rid": "hostile-1", "token": 1, "step": 0, "attempt": 1}]},
        "cancel": {"kind": "cancel", "to": [e, 0, 0], "rid": "hostile-1", "attempt": 1},
        "events": {"kind": "events", "to_stage0": [e, 0, 0],
                   "items": [{"rid": "hostile-1", "attempt": 1, "index": 0, "token": 1}]},
        "done": {"kind": "done", "rid": "hostile-1", "attempt": 1, "to_stage0": [e, 0, 0], "tokens": [1],
                 "prompt_tokens": [1, 2], "text": "x", "finish_reason": "length",
                 "timings": {"ttft_s": 0.1, "total_s": 0.2, "stage_compute_s": [0.1]}},
        "failed": {"kind": "done", "rid": "hostile-1", "attempt": 1, "error": "refused"},
        "dispatch": {"kind": "dispatch", "rid": "hostile-p", "prompt_ids": [1, 2, 3], "max_new_tokens": 2, "stop": [],
                     "params": params, "entry": t.me, "attempt": 1, "resume_tokens": [], "resumed": False},
        "placed": {"kind": "placed", "rid": "hostile-1", "attempt": 1,
                   "placement": {"epoch": e, "replica": 0, "head": t.me, "attempt": 1,
                                 "stages": [{"peer": p, "tp": 1, "layers": [0, 1]} for p in t.stage_peers]}},
        "placed_error": {"kind": "placed", "rid": "hostile-1", "attempt": 1,
                         "error": {"code": "busy", "message": "busy"}},
    }


def request_templates(t: Target) -> dict[str, tuple[str, dict]]:
    """name -> (protocol, message) of the request/response protocols."""
    return {
        "ping": (PING, {"pad": b"x"}),
        "peers": (PEERS, {}),
        "status": (STATUS, {}),
        "trace": (TRACE, {"rid": "hostile-1"}),
        "trace_local": (TRACE, {"rid": "hostile-1", "local": True}),
        "dispatch": (DISPATCH, {"rid": "hostile-d", "prompt_ids": [1, 2, 3], "max_new_tokens": 2, "stop": [],
                                "params": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0},
                                "entry": t.me, "attempt": 1, "resume_tokens": []}),
        "ready": (LAYOUT, {"ready": t.epoch}),
        "layout_get": (LAYOUT, {"get": True}),
        "direct": (DIRECT, {}),
        "submit": (SUBMIT, SUBMIT_TEMPLATE),
        "submit2": (SUBMIT2, {**SUBMIT_TEMPLATE, "timeout_s": 60}),
        "submit3": (SUBMIT3, {"submit": 1, "msg": {**SUBMIT_TEMPLATE, "timeout_s": 60}}),
        "weights_manifest": (WEIGHTS, {"manifest": t.model}),
        "weights_blocks": (WEIGHTS, {"blocks": [bytes(32), bytes(range(32))]}),
    }


SUBMIT_TEMPLATE = {"prompt": "Hello", "max_new_tokens": 2, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
                   "seed": 0, "stop": [], "stream": True, "request_id": "hostile-s"}


def layout_template(t: Target, head: str) -> dict:
    return {"type": "commit", "layout": {
        "epoch": t.epoch + 1, "head": head, "model": "m", "view": list(t.stage_peers),
        "replicas": [[{"peer": p, "tp": 1, "layers": [i, i + 1], "gpus": []} for i, p in enumerate(t.stage_peers)]],
        "predicted": {}}}


# ---- sending ---------------------------------------------------------------------------------
class Finding(AssertionError):
    """The swarm answered a hostile message with an internal error, or not at all."""


class Hostile:
    """A running hexswarm Node (admitted or not) used as the attacker; every method runs in its trio loop."""

    def __init__(self, node, target: Target):
        self.node = node
        self.target = target
        self.sent = 0
        self._direct: dict[str, Any] = {}

    async def request(self, peer: str, protocol: str, msg: Any) -> Any:
        """The reply envelope (of a submit: its first frame; the stream is then reset, so an accepted
        request is cancelled at once), or None when the peer closed or reset the stream; Finding on
        `internal` or a hang."""
        from libp2p.custom_types import TProtocol

        from hexswarm.net.host import parse_peer_id

        self.sent += 1
        field = {SUBMIT: "request_id", SUBMIT2: "request_id", DISPATCH: "rid"}.get(protocol)
        if field and isinstance(msg, dict) and msg.get(field) in ("hostile-s", "hostile-d"):
            # a fresh id each time: a stage 0 that re-admits an id (a newer attempt) while a step of the
            # replaced one is in flight credits that step to the new one and its engine fails (a stage
            # engine bug, reported apart from this boundary fuzz)
            msg = {**msg, field: f"{msg[field]}-{self.sent}"}
        inner = msg.get("msg") if protocol == SUBMIT3 and isinstance(msg, dict) else None
        if isinstance(inner, dict) and inner.get("request_id") == "hostile-s":  # a session's request: the same
            msg = {**msg, "msg": {**inner, "request_id": f"hostile-s-{self.sent}"}}
        try:
            with trio.fail_after(REPLY_TIMEOUT_S):
                stream = await self.node.host.new_stream(parse_peer_id(peer), [TProtocol(protocol)])
        except Exception:
            return None  # refused at negotiation: allowed
        try:
            try:
                await write_frame(stream, msg, timeout=REPLY_TIMEOUT_S)
                reply = await read_frame(stream, timeout=SUBMIT1_REPLY_TIMEOUT_S if protocol == SUBMIT
                                         else REPLY_TIMEOUT_S)
            except ProtocolError as e:
                if "within" in str(e):
                    raise Finding(f"{protocol} to {peer}: no reply to {_short(msg)}") from None
                return None
            answer = reply.get("frame") if isinstance(reply, dict) and "n" in reply else reply  # a session's
            if isinstance(answer, dict) and isinstance(answer.get("error"), dict) \
                    and answer["error"].get("code") == ErrorCode.INTERNAL:
                raise Finding(f"{protocol} to {peer}: internal error for {_short(msg)}: {reply}")
            return reply
        finally:
            await reset_quietly(stream)

    async def pipe(self, peer: str, msgs: list[Any]) -> None:
        """Messages over one libp2p pipe stream (no replies on the pipe)."""
        from libp2p.custom_types import TProtocol

        from hexswarm.net.host import parse_peer_id

        self.sent += len(msgs)
        try:
            with trio.fail_after(REPLY_TIMEOUT_S):
                stream = await self.node.host.new_stream(parse_peer_id(peer), [TProtocol(PIPE)])
                for m in msgs:
                    await stream.write(_frame(m))
        except Exception:
            return  # refused or reset by the receiver: allowed
        await reset_quietly(stream)

    async def direct(self, peer: str, ip: str, msgs: list[Any]) -> None:
        """Messages over the direct data path (a ticket asked for over libp2p; a stranger is refused
        one and so writes its frames with a made-up ticket to the port an admitted peer learned)."""
        from hexswarm.net.direct import TICKET_BYTES, DirectSender

        self.sent += len(msgs)
        offer = await self.request(peer, DIRECT, {})
        ok = isinstance(offer, dict) and isinstance(offer.get("ok"), dict)
        port = offer["ok"]["port"] if ok else self._direct.get(peer)
        if port is None:
            return
        self._direct[peer] = port
        try:
            with trio.fail_after(REPLY_TIMEOUT_S):
                stream = await trio.open_tcp_stream(ip, port)
                await stream.send_all(offer["ok"]["ticket"] if ok else bytes(TICKET_BYTES))
                sender = DirectSender(stream, offer["ok"]["key"] if ok else bytes(32))
                for m in msgs:
                    await sender.send(m, 1 << 24)
                await sender.aclose()
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ProtocolError):
            pass  # closed by the receiver: allowed

    async def gossip_record(self, ops: list) -> None:
        """An inventory record of ours with its body mutated, signed by our key."""
        from dataclasses import asdict

        from hexswarm.swarm.records import SIGNING_DOMAIN

        body = mutate(asdict(self.node.make_record()), ops)
        try:
            data = codec.encode(body)
        except ProtocolError:
            return
        self.sent += 1
        await self._publish(self.node.inventory_topic,
                            {"body": data, "sig": self.node.identity.sign(SIGNING_DOMAIN + data)})

    async def gossip_layout(self, ops: list, head: str) -> None:
        """A layout message with its content mutated, sealed by our key."""
        from hexswarm.net.signed import seal
        from hexswarm.serve.serving import LAYOUT_DOMAIN

        try:
            sealed = seal(mutate(layout_template(self.target, head), ops), self.node.identity, LAYOUT_DOMAIN)
        except ProtocolError:
            return
        self.sent += 1
        await self._publish(self.node.topic("layout"), sealed)

    async def _publish(self, topic: str, msg: dict) -> None:
        try:
            await self.node.publish(topic, msg)
        except Exception:
            pass  # too big for gossip, or no mesh yet: nothing was sent

    async def barrage(self, peers: list[tuple[str, str]], draw_ops) -> None:
        """One mutated message of every kind to every (peer, ip); `draw_ops()` gives a mutation list."""
        t = self.target
        for peer, ip in peers:
            for protocol, msg in request_templates(t).values():
                await self.request(peer, protocol, mutate(msg, draw_ops()))
            kinds = pipe_templates(t).values()
            await self.pipe(peer, [mutate(m, draw_ops()) for m in kinds])
            await self.direct(peer, ip, [mutate(m, draw_ops()) for m in kinds])
        await self.gossip_record(draw_ops())
        await self.gossip_layout(draw_ops(), t.me)
        await self.gossip_layout(draw_ops(), t.stage_peers[0])


def _frame(msg: Any) -> bytes:
    try:
        return codec.frame(msg)
    except ProtocolError:  # not encodable (e.g. a tensor of a refused dtype): send garbage instead
        return b"\x00\x00\x00\x03\xc1\xc1\xc1"


def _short(msg: Any) -> str:
    text = repr(msg)
    return text if len(text) < 300 else text[:300] + "..."


# ---- an attacker node ----------------------------------------------------------------------
def attacker_config(folder: Path, name: str, swarm: str, owner: str | None = None, cert: Path | None = None,
                    **keys: Any) -> Path:
    """A node config for an in-process attacker (not serving); with `owner` and `cert` it is
    admitted (a node certificate of the swarm's owner) or not (one of another owner)."""
    from hexswarm.launcher import write_node_config

    extra = {"swarm_owner": owner, "admission_cert": str(cert)} if owner else {}
    return write_node_config(folder, name, swarm=swarm, log_level="warning", **extra, **keys)


class AttackerThread:
    """A hexswarm Node (not serving) in a trio loop on its own thread, joined to a swarm;
    `call(fn, *args)` runs ``await fn(*args)`` in that loop."""

    def __init__(self, config: Path, bootstrap: list[str], join_s: float = 60.0):
        import threading

        from hexswarm.swarm.config import load_config
        from hexswarm.swarm.node import Node

        self.node = Node(load_config(config, {"bootstrap": bootstrap}))
        self._ready, self._stop = threading.Event(), None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name=f"attacker-{config.parent.name}")
        self._thread.start()
        if not self._ready.wait(join_s) or self.error is not None:
            raise RuntimeError(f"attacker node did not start: {self.error!r}")

    def _main(self) -> None:
        async def run() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.node.run)
                self._ready.set()
                await self._stop.wait()
                self.node.stop()
                nursery.cancel_scope.cancel()

        try:
            trio.run(run)
        except BaseException as e:  # reported by the constructor, or by close()
            self.error = e
            self._ready.set()

    def call(self, fn, *args) -> Any:
        import trio.from_thread

        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        import trio.from_thread

        if self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(15)

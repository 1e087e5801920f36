"""Fuzz by schema (issue 13): every protocol and every message kind, mutated by hypothesis (values of every
wrong type, non-finite and huge numbers, missing and extra fields, whole messages replaced), sent to a real
two-node swarm with an owner, from an admitted node (a malicious insider) and from a stranger.

Each message gets an error, a closed stream or a normal answer, never an `internal` error and never
silence; afterwards both nodes are alive, a request is served with the tokens of `generate`, and no
node logged a traceback or an unexpected handler failure.  One swarm serves the whole module.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from hexswarm.net.identity import generate
from hexswarm.launcher import LocalSwarm, peer_id_of
from conftest import load_tool
from swarmutil import reference, submit_many

# the attacker nodes' own threads use `random` while hypothesis draws: not the strategies' doing
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")]


hostile = load_tool("hostile")

OPS = st.lists(st.tuples(st.integers(0, 1 << 20), st.sampled_from(["replace", "replace", "drop", "extra", "whole"]),
                         st.sampled_from(hostile.WRONG_VALUES) | st.integers(-(2**63), 2**64 - 1) | st.floats()),
               min_size=1, max_size=3)
PER_EXAMPLE = 6  # mutated copies of each template per example: many messages per swarm round trip
# no shrinking: every step of it is a round trip to the swarm (minutes); the failing message is in the error
FUZZ = settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), database=None,
               phases=[Phase.explicit, Phase.generate])
LOOPBACK = "127.0.0.1"
IDLE_S = 2.0  # the swarm's pipe_idle_s: a silent inbound pipe stream is closed after twice that


@pytest.fixture(scope="module")
def fx(tiny_model, tmp_path_factory):
    from hexswarm.model.config import LlamaConfig

    folder = tmp_path_factory.mktemp("fuzz-swarm")
    owner = generate()
    sw = LocalSwarm(folder, tiny_model, [1, 1], serve_layout={"hetero_config": [1, 1], "pp_partition": [2, 2]},
                    owner=owner, extra={"dispatch_wait_s": 3.0, "pipe_idle_s": IDLE_S})
    client = generate()
    sw.client = (client, _cert(sw, client.peer_id.to_base58(), "client"))
    attackers = []
    try:
        sw.start()
        status = sw.wait_layout(120)
        boot = [sw.nodes[0].addr]
        insider_cfg = hostile.attacker_config(folder, "insider", sw.swarm)
        insider_cfg = hostile.attacker_config(folder, "insider", sw.swarm, owner.peer_id.to_base58(),
                                              sw.certificate(peer_id_of(insider_cfg)))
        fake = LocalSwarm(folder / "fake", tiny_model, [], swarm=sw.swarm, owner=generate())
        stranger_cfg = hostile.attacker_config(folder, "stranger", sw.swarm)
        stranger_cfg = hostile.attacker_config(folder, "stranger", sw.swarm, fake.owner.peer_id.to_base58(),
                                               fake.certificate(peer_id_of(stranger_cfg)))
        hidden = LlamaConfig.from_dir(tiny_model).hidden_size
        for cfg in (insider_cfg, stranger_cfg):
            attacker = hostile.AttackerThread(cfg, boot)
            attackers.append(attacker)
            attacker.hostile = hostile.Hostile(attacker.node, hostile.Target.from_status(
                status, hidden, attacker.node.peer_id_str))
        yield SimpleNamespace(sw=sw, status=status, insider=attackers[0], stranger=attackers[1],
                              peers=[(n.peer_id, LOOPBACK) for n in sw.nodes])
    finally:
        for attacker in attackers:
            attacker.close()
        sw.stop()


def _cert(sw: LocalSwarm, peer: str, role: str) -> dict:
    from hexswarm.net import codec

    return codec.decode(sw.certificate(peer, role).read_bytes())


def _attacker(fx, who: str):
    return fx.insider if who == "insider" else fx.stranger


def _draws(data) -> list:
    return [data.draw(OPS) for _ in range(PER_EXAMPLE)]


@pytest.mark.parametrize("who", ["insider", "stranger"])
@FUZZ
@given(data=st.data())
def test_request_protocols_and_submit(fx, who, data):
    a = _attacker(fx, who)
    for protocol, template in hostile.request_templates(a.hostile.target).values():
        for ops in _draws(data):
            msg = hostile.mutate(template, ops)
            for peer, _ in fx.peers:
                a.call(a.hostile.request, peer, protocol, msg)


@pytest.mark.parametrize("who", ["insider", "stranger"])
@pytest.mark.parametrize("path", ["pipe", "direct"])
@FUZZ
@given(data=st.data())
def test_pipe_messages_of_every_kind(fx, who, path, data):
    a = _attacker(fx, who)
    msgs = [hostile.mutate(m, ops) for m in hostile.pipe_templates(a.hostile.target).values() for ops in _draws(data)]
    for peer, ip in fx.peers:
        if path == "pipe":
            a.call(a.hostile.pipe, peer, msgs)
        else:
            a.call(a.hostile.direct, peer, ip, msgs)


@pytest.mark.parametrize("who", ["insider", "stranger"])
@FUZZ
@given(data=st.data())
def test_gossip(fx, who, data):
    a = _attacker(fx, who)
    for ops in _draws(data):
        a.call(a.hostile.gossip_record, ops)
        a.call(a.hostile.gossip_layout, ops, a.node.peer_id_str)  # signed by its own head
        a.call(a.hostile.gossip_layout, ops, fx.status["head"])  # claims the real head


async def _open_pipes(host, addr: str, n: int) -> list:
    """n pipe streams to the node at `addr`, over one connection dialled first (the attacker knows only the
    bootstrap node's address: without the dial every open failed and read as "closed", proving nothing)."""
    from libp2p.custom_types import TProtocol

    from hexswarm.net.host import dial, is_connected, parse_peer_multiaddr
    from hexswarm.net.protocols import PIPE

    info = parse_peer_multiaddr(addr, "node")
    await dial(host, info)
    streams = []
    for _ in range(n):
        try:
            streams.append(await host.new_stream(info.peer_id, [TProtocol(PIPE)]))
        except Exception:
            if not is_connected(host, info.peer_id):
                raise
            streams.append(None)  # reset by the node before the stream was fully open: refused
    return streams


async def _closed_within(stream, seconds: float) -> bool:
    """Did the node close (or reset) this silent stream within `seconds`?"""
    import trio

    if stream is None:
        return True
    with trio.move_on_after(seconds):
        try:
            while await stream.read(1024):
                pass
        except Exception:
            pass
        return True
    return False


def test_inbound_pipe_streams_are_bounded_per_peer_and_closed_when_idle(fx):
    from hexswarm.serve.pipe import MAX_INBOUND_PER_PEER

    a, node = fx.insider, fx.sw.nodes[1]

    async def check():
        import trio

        t0 = trio.current_time()
        streams = await _open_pipes(a.node.host, node.addr, MAX_INBOUND_PER_PEER + 2)
        await trio.sleep(0.5)
        over = [await _closed_within(s, 0.5) for s in streams]
        assert sum(over) >= 2, f"{len(streams)} silent pipe streams from one peer all stayed open"
        assert all([await _closed_within(s, 4 * IDLE_S) for s in streams]), "a silent pipe stream stayed open"
        assert trio.current_time() - t0 >= IDLE_S, "closed before it was idle"  # the receiver waits 2 x IDLE_S

    a.call(check)


def test_request_streams_are_bounded_per_peer(fx):
    from hexswarm.net.protocols import DEFAULT_MAX_CONCURRENT, PING

    a, peer = fx.insider, fx.sw.nodes[0].peer_id

    async def check():
        from libp2p.custom_types import TProtocol

        from hexswarm.net.host import parse_peer_id

        held = [await a.node.host.new_stream(parse_peer_id(peer), [TProtocol(PING)])
                for _ in range(DEFAULT_MAX_CONCURRENT // 4)]  # each waits for its request frame
        reply = await a.hostile.request(peer, PING, {"pad": b""})
        for s in held:
            await s.reset()
        return reply

    reply = a.call(check)
    assert reply["error"]["code"] == "busy" and "of yours in flight" in reply["error"]["message"], reply
    assert a.call(a.hostile.request, peer, PING, {"pad": b""}) == {"ok": {"n": 0}}


def test_a_client_reads_its_own_traces_and_nothing_else(fx):
    """Role client (issue 13): submit, and the traces of its own requests; nothing else."""
    import trio

    from hexswarm.errors import UserError
    from hexswarm.net.client import ask
    from hexswarm.net.protocols import DISPATCH, TRACE
    from hexswarm.api.client import submit_to

    client, cert = fx.sw.client
    entry = fx.sw.nodes[0].addr
    done = trio.run(submit_to, entry, {"prompt": "Hello", "max_new_tokens": 3, "request_id": "mine"}, None, 60,
                    client, cert)
    assert "done" in done, done
    trace = trio.run(ask, entry, TRACE, {"rid": "mine", "cert": cert}, 10.0, client)
    assert trace["request_id"] == "mine" and trace["attempts"] and trace["spans"]
    other = generate()
    other_cert = _cert(fx.sw, other.peer_id.to_base58(), "client")
    for who, c, msg in ((other, other_cert, {"rid": "mine"}), (client, cert, {"rid": "mine", "local": True})):
        with pytest.raises(UserError, match="forbidden"):
            trio.run(ask, entry, TRACE, {**msg, "cert": c}, 10.0, who)
    with pytest.raises(UserError, match="forbidden"):
        trio.run(ask, entry, DISPATCH, {"cert": cert}, 10.0, client)


def test_after_the_fuzz_the_swarm_serves_and_logged_no_traceback(fx, tiny_model):
    sent = fx.insider.hostile.sent + fx.stranger.hostile.sent
    assert sent > 1000, f"only {sent} hostile messages were sent: the fuzz proved little"
    dead = [n for n in fx.sw.nodes if not n.alive()]
    assert not dead, "\n".join(n.log()[-4000:] for n in dead)
    st_ = fx.sw.wait_layout(60)
    assert st_["layout"]["epoch"] == fx.status["layout"]["epoch"], "the fuzz changed the layout"
    for node in fx.sw.nodes:
        (res,) = submit_many([(node.addr, {"prompt": "Hello, world!", "max_new_tokens": 8})])
        assert res["done"]["tokens"] == reference(tiny_model, "Hello, world!", 8)["tokens"]
    for node in fx.sw.nodes:
        log = node.log()
        assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]
        assert "unexpected" not in log, [line for line in log.splitlines() if "unexpected" in line][:5]

"""Property tests: garbage at every protocol handler of a real node process; it answers an error or closes, and keeps serving.

A client host runs in a trio loop on a helper thread; each hypothesis example
opens a fresh stream to the node (another process), sends bytes, half-closes,
and reads whatever comes back.
"""

from __future__ import annotations

import struct
import threading

import msgpack
import pytest
import trio
import trio.from_thread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hexswarm.errors import ProtocolError
from hexswarm.net import codec
from hexswarm.net.framing import read_frame
from hexswarm.net.protocols import PEERS, PING, RECORDS, request
from netutil import NodeProcess, wait_for, write_config

pytestmark = pytest.mark.slow
PROTOCOLS = [PING, PEERS, RECORDS]
REPLY_TIMEOUT_S = 5.0


class Client:
    """A libp2p host on its own thread; `call(fn, *args)` runs `await fn(host, *args)` there."""

    def __init__(self, target_addr: str):
        self._ready = threading.Event()
        self._done: trio.Event | None = None
        self._target = target_addr
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"client did not start: {self.error}")

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as e:  # surfaced by the waiting test
            self.error = e
            self._ready.set()

    async def _run(self) -> None:
        import multiaddr

        from hexswarm.net import identity
        from hexswarm.net.host import dial_with_retry, make_host, parse_peer_multiaddr

        self.host = make_host(identity.generate())
        self.info = parse_peer_multiaddr(self._target)
        async with self.host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            await dial_with_retry(self.host, self.info, attempts=5)
            self._token = trio.lowlevel.current_trio_token()
            self._done = trio.Event()
            self._ready.set()
            await self._done.wait()

    def call(self, fn, *args):
        return trio.from_thread.run(fn, self.host, self.info.peer_id, *args, trio_token=self._token)

    def close(self) -> None:
        trio.from_thread.run_sync(self._done.set, trio_token=self._token)
        self._thread.join(10)


async def send_raw(host, peer_id, protocol: str, data: bytes):
    """Send raw bytes, half-close, return the decoded reply frame or None if the node closed/reset."""
    from libp2p.custom_types import TProtocol

    stream = await host.new_stream(peer_id, [TProtocol(protocol)])
    try:
        await stream.write(data)
        await stream.close()  # half-close: the node sees EOF after our bytes
        try:
            return await read_frame(stream, timeout=REPLY_TIMEOUT_S)
        except ProtocolError as e:
            if "within" in str(e):
                raise  # a timeout means the node hung on us
            return None  # closed or reset: allowed
    finally:
        try:
            await stream.reset()
        except Exception:
            pass


async def still_serving(host, peer_id) -> bool:
    reply = await request(host, peer_id, PING, {"pad": b"x"}, timeout=REPLY_TIMEOUT_S)
    return reply == {"n": 1}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    node = NodeProcess(write_config(tmp_path_factory.mktemp("fuzz"), "target")).start().wait_listening()
    try:
        c = Client(node.addr)
        yield c
        c.close()
    finally:
        node.kill()


def _assert_error_or_closed(reply) -> None:
    assert reply is None or (isinstance(reply, dict) and ("error" in reply or "ok" in reply)), reply
    if isinstance(reply, dict) and "error" in reply:
        assert isinstance(reply["error"]["code"], str)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(-(2**63), 2**64 - 1), inner, max_size=4),
    max_leaves=12,
)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(protocol=st.sampled_from(PROTOCOLS), data=st.binary(max_size=300))
def test_random_bytes(client, protocol, data):
    _assert_error_or_closed(client.call(send_raw, protocol, data))
    assert client.call(still_serving)


@FUZZ
@given(protocol=st.sampled_from(PROTOCOLS), msg=msgpack_values, cut=st.integers(0, 1000))
def test_truncated_frames(client, protocol, msg, cut):
    frame = codec.frame(msg)
    _assert_error_or_closed(client.call(send_raw, protocol, frame[: min(cut, len(frame) - 1)]))
    assert client.call(still_serving)


@FUZZ
@given(protocol=st.sampled_from(PROTOCOLS), length=st.integers((1 << 20) + 1, 2**32 - 1), tail=st.binary(max_size=64))
def test_oversized_lengths(client, protocol, length, tail):
    reply = client.call(send_raw, protocol, struct.pack(">I", length) + tail)
    assert reply["error"]["code"] == "bad_request" and "exceeds" in reply["error"]["message"]
    assert client.call(still_serving)


@FUZZ
@given(protocol=st.sampled_from(PROTOCOLS), msg=msgpack_values)
def test_wrong_types(client, protocol, msg):
    reply = client.call(send_raw, protocol, codec.frame(msg))
    _assert_error_or_closed(reply)
    assert client.call(still_serving)


@FUZZ
@given(protocol=st.sampled_from(PROTOCOLS), code=st.integers(0, 127), payload=st.binary(max_size=64))
def test_unknown_and_bad_ext_types(client, protocol, code, payload):
    body = msgpack.packb({"pad": msgpack.ExtType(code, payload)})
    _assert_error_or_closed(client.call(send_raw, protocol, struct.pack(">I", len(body)) + body))
    assert client.call(still_serving)


def test_valid_requests_answered(client):
    assert client.call(still_serving)
    reply = client.call(send_raw, PEERS, codec.frame({}))
    assert "ok" in reply and reply["ok"]["peers"]
    assert wait_for(lambda: client.call(still_serving), 5)

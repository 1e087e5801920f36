"""A py-libp2p host with exactly TCP + noise + yamux, multiaddr parsing, and dialing with back-off.

py-libp2p's default security list also offers plaintext, secio and TLS; we pass
noise alone so that no connection of ours is ever unencrypted.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from hexswarm.errors import UserError
from hexswarm.net.identity import Identity

log = logging.getLogger(__name__)

DIAL_TIMEOUT_S = 5.0
# A yamux frame that cannot be written whole in this long: its connection is closed (see _shield_frame_writes).
FRAME_WRITE_TIMEOUT_S = 30.0


def parse_multiaddr(text: str, what: str = "multiaddr"):
    """A Multiaddr, or UserError naming `what`."""
    from multiaddr import Multiaddr

    try:
        return Multiaddr(text)
    except Exception as e:
        raise UserError(f"{what} {text!r} is not a valid multiaddr: {e}") from None


def parse_peer_multiaddr(text: str, what: str = "peer address"):
    """A PeerInfo from /ip4/.../tcp/.../p2p/<PeerID>, or UserError naming `what`."""
    from libp2p.peer.peerinfo import info_from_p2p_addr

    addr = parse_multiaddr(text, what)
    try:
        return info_from_p2p_addr(addr)
    except Exception as e:
        raise UserError(f"{what} {text!r} must end in /p2p/<PeerID>: {e}") from None


def parse_peer_id(text: str, what: str = "PeerID"):
    from libp2p.peer.id import ID

    try:
        peer_id = ID.from_base58(text)
        raw = peer_id.to_bytes()
    except Exception:
        raise UserError(f"{what} {text!r} is not a valid PeerID") from None
    # base58 decodes almost any text; a PeerID is an identity (0x00) or
    # sha2-256 (0x12) multihash whose length byte matches.
    if len(raw) < 3 or raw[0] not in (0x00, 0x12) or raw[1] != len(raw) - 2 or peer_id.to_base58() != text:
        raise UserError(f"{what} {text!r} is not a valid PeerID")
    return peer_id


def make_host(identity: Identity):
    """A host keyed by `identity`; start it with `async with host.run(listen_addrs)`."""
    from libp2p import new_host
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
    from libp2p.custom_types import TProtocol
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as Noise
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

    from hexswarm.logformat import quiet_libp2p

    quiet_libp2p(once=True)  # a client command's host too: it says what failed itself, in one line
    _shield_frame_writes(Yamux)
    _batch_window_updates(YamuxStream)
    _read_yamux_env_once()
    key_pair = identity.libp2p_key_pair()
    host = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_ID): Noise(key_pair, noise_privkey=new_x25519().private_key)},
        muxer_opt={TProtocol(YAMUX_ID): Yamux},
        enable_mDNS=False,
        enable_upnp=False,
        connection_config=ConnectionConfig(min_connections=0, low_watermark=0),
    )
    # py-libp2p's auto-connector dials every peer in the peerstore, aiming at
    # (low + high watermark) / 2 connections, whatever the watermarks; we
    # choose whom to dial ourselves (same swarm, allowlisted), so it is off.
    host.get_network().auto_connector.maybe_connect = _no_auto_connect
    return host


async def _no_auto_connect() -> None:
    return None


def _shield_frame_writes(yamux_cls) -> None:
    """Write every yamux frame whole, whatever happens to the task that writes it.

    py-libp2p 0.8.1 encrypts a frame with the connection's next Noise nonce and then sends it; a
    cancellation delivered at the send (a caller's timeout that expired while the task waited for the
    CPU, or while a long frame was going out) leaves that nonce unused or the frame cut, and the peer's
    next decryption fails (NoiseInvalidMessage): it drops the whole connection, every stream on it.
    Measured on a loaded machine (24 nodes, tools/swarm_scale.py): 147 connections lost that way in
    3 minutes, each re-dialed (Noise handshake, identify, gossipsub streams), none with the shield.
    So the write runs shielded; one that cannot finish in FRAME_WRITE_TIMEOUT_S (the peer stopped
    reading) closes the connection, and the caller's cancellation, if any, is delivered just after.
    """
    if getattr(yamux_cls._write_frame, "_hexswarm_shielded", False):
        return
    from libp2p.network.connection.exceptions import RawConnError

    async def _write_frame(self, data: bytes) -> None:
        async with self._write_lock:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(FRAME_WRITE_TIMEOUT_S) as stuck:
                    await self.secured_conn.write(data)
                if stuck.cancelled_caught:  # part of the frame may be out: the connection is unusable
                    with trio.move_on_after(5):
                        try:
                            await self.secured_conn.close()
                        except Exception as e:
                            log.debug("closing a connection whose write was stuck: %s", e)
                    raise RawConnError(f"yamux frame not written in {FRAME_WRITE_TIMEOUT_S:g} s: connection closed")
        await trio.lowlevel.checkpoint()

    _write_frame._hexswarm_shielded = True
    yamux_cls._write_frame = _write_frame


def _read_yamux_env_once() -> None:
    """py-libp2p 0.8.1's yamux looks up its PY_YAMUX_* tuning variables in os.environ on every read's window
    check: ~4 us a read for two lookups that miss, ~1 us cached (timeit, BENCHMARKS run 23), and 5% of a CPU
    entry's loop samples at 32 submit requests.  They are set before a process starts: each is read once."""
    from libp2p.stream_muxer.yamux import yamux

    if getattr(yamux._py_yamux_env, "_hexswarm_once", False):
        return
    for name in ("_py_yamux_env", "_py_yamux_env_set"):
        once = functools.lru_cache(maxsize=None)(getattr(yamux, name))
        once._hexswarm_once = True
        setattr(yamux, name, once)


def _batch_window_updates(stream_cls) -> None:
    """Give a yamux stream's read bytes back to its sender in batches of half the window (go-yamux's rule).

    py-libp2p 0.8.1 sends a WINDOW_UPDATE frame after almost every read (its "partial slack" and
    "release on read" branches), and gossipsub reads each RPC's varint length a byte at a time, so one
    small gossip message cost the receiver up to three extra frames to encrypt and send and the sender
    as many to read and decrypt.  Measured (16 nodes, tools/swarm_scale.py, one node over 10 s): 679
    window updates for 200 data frames written.  Here the credit goes back once the bytes consumed since
    the last update reach half the target window (PY_YAMUX_DISABLE_HYSTERESIS still means at once), with
    py-libp2p's window auto-tuning as before; the sender never waits while the receiver has read past
    half its window.
    """
    if getattr(stream_cls._auto_tune_and_send_window_update, "_hexswarm_batched", False):
        return

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            consumed = self.target_recv_window - (self.recv_window + buffered)
            if consumed <= 0 or consumed < self._grow_threshold():
                return
            increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
        await self.send_window_update(increment, skip_lock=True)

    _auto_tune_and_send_window_update._hexswarm_batched = True
    stream_cls._auto_tune_and_send_window_update = _auto_tune_and_send_window_update


def advertised_addrs(host) -> list[str]:
    """Dialable /ip4/.../tcp/.../p2p/<id> addresses: wildcards expanded to interfaces, loopback last."""
    from libp2p.utils.address_validation import expand_wildcard_address

    peer_id = host.get_id()
    out: list[str] = []
    for addr in host.get_transport_addrs():
        for concrete in expand_wildcard_address(addr):
            text = f"{concrete}/p2p/{peer_id}"
            if text not in out:
                out.append(text)
    return sorted(out, key=lambda a: ("/127.0.0.1/" in a or "/::1/" in a, a))


def is_connected(host, peer_id) -> bool:
    return bool(host.get_network().connections.get(peer_id))


async def dial(host, peer_info, timeout: float = DIAL_TIMEOUT_S) -> None:
    """Connect to a peer; raises ConnectionError (with the cause) when that fails."""
    # py-libp2p refuses to dial a peer for 60 s after one failed dial (its
    # "negative cache"); our callers run their own back-off, so clear it.
    host.get_network().unblock_peer(peer_info.peer_id)
    with trio.move_on_after(timeout):
        try:
            await host.connect(peer_info)
        except Exception as e:
            raise ConnectionError(f"{type(e).__name__}: {e}") from None
        return
    raise ConnectionError(f"no connection within {timeout:g} s")


@dataclass
class Backoff:
    """Exponential back-off with jitter: initial, ×factor per failure, capped."""

    initial_s: float = 0.5
    max_s: float = 10.0
    factor: float = 2.0
    _next: float = field(default=0.0, init=False)

    def reset(self) -> None:
        self._next = 0.0

    def next_delay(self) -> float:
        self._next = self.initial_s if self._next == 0.0 else min(self.max_s, self._next * self.factor)
        return self._next * random.uniform(0.8, 1.2)


async def dial_with_retry(host, peer_info, attempts: int, backoff: Backoff | None = None) -> None:
    """Dial up to `attempts` times with back-off; raises the last ConnectionError."""
    backoff = backoff or Backoff()
    for attempt in range(1, attempts + 1):
        try:
            await dial(host, peer_info)
            return
        except ConnectionError as e:
            if attempt == attempts:
                raise
            delay = backoff.next_delay()
            log.debug("dial %s failed (%s); retry in %.1f s", peer_info.peer_id, e, delay)
            await trio.sleep(delay)


def listen_multiaddrs(texts: Sequence[str]) -> list:
    return [parse_multiaddr(t, "listen address") for t in texts]

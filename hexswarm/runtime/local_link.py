"""Stage engines on one host hand their step messages to each other directly.

Between two stages of a pipeline that run on the same host, a `forward` (activations) or
`tokens` message would otherwise cross the sender's engine pipe, its node's event loop, a
TCP hop, the receiver's event loop and its engine pipe: measured on an H100, ~4 ms per extra
stage per token (docs/BENCHMARKS.md).  Here each stage engine listens on a Unix socket named
by (peer, epoch, replica, stage) in a private directory of this user, and the engine that
sends to it connects there and writes codec frames from its own thread.

Trust: the directory is this user's and mode 0700, and both ends check the other's uid
(SO_PEERCRED), so only processes of the user running the nodes can speak on a link; they
could read the nodes' keys anyway.  A link that cannot be made or breaks is not an error:
the message goes through the node as before (`send` returns False), and the link is tried
again after RETRY_S.

Where both engines use the same GPU from different processes, the tensor of each message stays on
the GPU (runtime/gpu_handoff.py): the sender's hello carries a CUDA-IPC ring of buffers for it,
the receiver answers whether it could open the ring, and from then on a message names a ring slot
(`dev: [slot, rows]`) instead of carrying bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hexswarm.errors import ProtocolError
from hexswarm.net import codec

log = logging.getLogger(__name__)

StageKey = tuple[int, int, int]  # (epoch, replica, stage index)
RETRY_S = 1.0
SEND_TIMEOUT_S = 2.0  # a frozen receiver: the message goes through the node (which queues) instead
MAX_HEAD = 64 << 20  # a message without its tensors
SOCKET_BUFFER = 8 << 20  # a prefill chunk's activations in one write
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class LinkSpec:
    me: str  # this node's peer id
    key: StageKey  # the stage this engine serves
    run_dir: str
    device: str = "cpu"  # this engine's device: rings are shared only between engines on one GPU
    capacity: int = 0  # rows of a ring buffer (the step's token budget); 0: no GPU handoff
    depth: int = 1  # ring slots: the steps a pipeline has in flight


@dataclass
class _Out:
    """One outbound link: its socket, and its GPU ring if the receiver opened one."""

    sock: socket.socket
    field: str | None = None  # the message key whose tensor rides the ring
    ring: object = None  # gpu_handoff.HandoffOut


def default_run_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return str(Path(base) / f"hexswarm-{os.getuid()}")


def socket_path(run_dir: str, peer: str, key: StageKey) -> str:
    # hashed: a Unix socket path is at most 107 bytes and peer ids are long
    digest = hashlib.sha256(peer.encode()).hexdigest()[:20]
    return str(Path(run_dir) / f"{digest}-e{key[0]}r{key[1]}s{key[2]}.sock")


def private_dir(run_dir: str) -> bool:
    """Create run_dir (0700) if needed; True when it is a directory of ours that no one else may use."""
    try:
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        st = os.lstat(run_dir)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def _peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


def _same_user(sock: socket.socket) -> bool:
    _pid, uid, _gid = _peer_cred(sock)
    return uid == os.getuid()


def _recv_into(sock: socket.socket, view: memoryview) -> bool:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return False
        got += k
    return True


def torch_device(name: str):
    import torch

    return torch.device(name)


def write_message(sock: socket.socket, msg: dict) -> None:
    """A codec frame of msg with its top-level tensors left out, then each tensor's bytes as they
    lie in memory (no copies into msgpack: a prefill chunk's activations are megabytes)."""
    import torch

    tensors = [(k, v.detach().contiguous().cpu()) for k, v in msg.items() if isinstance(v, torch.Tensor)]
    head = {"m": {k: v for k, v in msg.items() if not isinstance(v, torch.Tensor)},
            "t": [[k, str(t.dtype).removeprefix("torch."), list(t.shape)] for k, t in tensors]}
    body = codec.encode(head)
    sock.sendall(codec.FRAME_HEADER.pack(len(body)) + body)
    for _, t in tensors:
        if t.numel():
            sock.sendall(t.reshape(-1).view(torch.uint8).numpy().data)


def read_message(sock: socket.socket) -> dict | None:
    """One message written by write_message; None at the end of the stream."""
    import torch

    header = bytearray(codec.FRAME_HEADER.size)
    if not _recv_into(sock, memoryview(header)):
        return None
    body = bytearray(codec.frame_length(bytes(header), MAX_HEAD))
    if not _recv_into(sock, memoryview(body)):
        return None
    head = codec.decode(body, MAX_HEAD, tensors=True)
    if not (isinstance(head, dict) and isinstance(head.get("m"), dict) and isinstance(head.get("t"), list)):
        raise ProtocolError("local link frame is not {m, t}")
    msg = head["m"]
    for item in head["t"]:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
            raise ProtocolError("local link tensor entry")
        key, name, shape = item
        raw = torch.empty(codec.tensor_nbytes(name, shape), dtype=torch.uint8)
        if raw.numel() and not _recv_into(sock, memoryview(raw.numpy()).cast("B")):
            return None
        msg[key] = raw.view(getattr(torch, name)).reshape(shape)
    return msg


class LocalLinks:
    """This engine's end of its links: a listener for the engines that send to it, and one
    connection per (peer, stage) it sends to.  deliver(msg) is called from reader threads."""

    def __init__(self, spec: LinkSpec, deliver: Callable[[dict], None]):
        self.spec = spec
        self._deliver = deliver
        self._out: dict[tuple[str, StageKey], _Out] = {}
        self._retry_at: dict[tuple[str, StageKey], float] = {}
        self._closed = False
        self._listener: socket.socket | None = None
        self._inbound: set[socket.socket] = set()
        self.path = socket_path(spec.run_dir, spec.me, spec.key)
        if not private_dir(spec.run_dir):
            log.warning("local links off: %s is not a private directory of this user", spec.run_dir)
            return
        try:
            if os.path.exists(self.path):
                os.unlink(self.path)  # left by a process of ours that died
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.path)
            listener.listen(16)
        except OSError as e:
            log.warning("local links off: cannot listen on %s: %s", self.path, e)
            return
        self._listener = listener
        threading.Thread(target=self._accept, name=f"link-accept-{spec.key}", daemon=True).start()

    # ---- sending (the engine's thread) ---------------------------------------------------
    def send(self, peer: str, key: StageKey, msg: dict) -> bool:
        """Write msg to that stage's engine if it runs on this host; False: send it another way."""
        dest = (peer, key)
        link = self._out.get(dest) or self._connect(dest)
        if link is None:
            return False
        msg["sent_at"] = time.time()
        out = msg
        t = msg.get(link.field) if link.ring is not None else None
        if t is not None and link.ring.fits(t):
            out = {k: v for k, v in msg.items() if k != link.field}
            out["dev"] = link.ring.put(t)
        try:
            write_message(link.sock, out)
            return True
        except OSError as e:  # the receiver went away or is frozen; a half-written frame ends the link
            log.info("local link to %s %s broke (%s); through the node", peer[:12], key, e)
            self._drop(dest)
            return False

    def gpu_path(self, peer: str, key: StageKey, field: str, like) -> bool:
        """Whether a message with tensor `like` under `field` would stay on the GPU to that stage
        (connecting, and offering a ring shaped like it, if there is no link yet)."""
        if not (self.spec.capacity and getattr(like, "is_cuda", False)):
            return False
        dest = (peer, key)
        link = self._out.get(dest) or self._connect(dest, field, like)
        return link is not None and link.field == field and link.ring is not None and link.ring.fits(like)

    def _connect(self, dest: tuple[str, StageKey], field: str | None = None, like=None) -> _Out | None:
        if self._listener is None or time.monotonic() < self._retry_at.get(dest, 0.0):
            return None
        path = socket_path(self.spec.run_dir, *dest)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        link = _Out(sock)
        try:
            sock.connect(path)
            if not _same_user(sock):
                raise OSError("the listener is another user's")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.settimeout(SEND_TIMEOUT_S)
            hello = {"peer": self.spec.me, "key": list(self.spec.key)}
            ring = self._offer_ring(like)
            if ring is not None:
                hello["ring"] = {"field": field, "gpu": ring[1], **ring[0].export()}
            write_message(sock, hello)
            reply = read_message(sock)
            if not isinstance(reply, dict):
                raise OSError("no answer to the hello")
            if ring is not None and reply.get("ring") is True:
                link.field, link.ring = field, ring[0]
        except (OSError, ProtocolError):
            sock.close()
            self._retry_at[dest] = time.monotonic() + RETRY_S
            return None
        log.info("local link to %s stage %s%s", dest[0][:12], dest[1], " (on the GPU)" if link.ring else "")
        self._out[dest] = link
        return link

    def _offer_ring(self, like):
        if like is None or not getattr(like, "is_cuda", False) or not self.spec.capacity:
            return None
        from hexswarm.runtime import gpu_handoff

        try:
            return gpu_handoff.HandoffOut(like, self.spec.capacity, self.spec.depth), gpu_handoff.device_uuid(like.device)
        except (RuntimeError, OSError) as e:  # no IPC on this GPU or driver: bytes through the host
            log.info("no GPU handoff: %s", e)
            return None

    def _drop(self, dest: tuple[str, StageKey]) -> None:
        link = self._out.pop(dest, None)
        if link is not None:
            link.sock.close()
        self._retry_at[dest] = time.monotonic() + RETRY_S

    # ---- receiving ----------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if not _same_user(conn):
                conn.close()
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            self._inbound.add(conn)
            threading.Thread(target=self._read, args=(conn,), name=f"link-read-{self.spec.key}", daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        try:
            hello = read_message(conn)
            if not (isinstance(hello, dict) and isinstance(hello.get("peer"), str)):
                return
            sender = hello["peer"]
            field, ring = self._open_ring(conn, hello.get("ring"))
            write_message(conn, {"ring": ring is not None})
            while True:
                msg = read_message(conn)
                if msg is None:
                    return
                if not isinstance(msg, dict):
                    continue
                if "dev" in msg:
                    if ring is None or not ring.valid(msg["dev"]):
                        raise ProtocolError("a GPU slot on a link without that ring")
                    msg[field] = ring.handoff(msg.pop("dev"))
                msg["_sender"], msg["_recv_at"] = sender, time.time()
                self._deliver(msg)
        except Exception as e:  # one bad link ends itself, never the engine
            if not self._closed:
                log.warning("local link read failed: %s: %s", type(e).__name__, e)
        finally:
            self._inbound.discard(conn)
            conn.close()

    def _open_ring(self, conn: socket.socket, offer):
        """Open the sender's GPU ring if it is on this engine's GPU and in another process."""
        if not (isinstance(offer, dict) and isinstance(offer.get("field"), str)):
            return None, None
        from hexswarm.runtime import gpu_handoff

        pid, _uid, _gid = _peer_cred(conn)
        try:
            if pid == os.getpid() or offer.get("gpu") is None or offer["gpu"] != gpu_handoff.device_uuid(self.spec.device):
                return None, None
            return offer["field"], gpu_handoff.HandoffIn(offer, torch_device(self.spec.device))
        except Exception as e:  # a ring we cannot open: bytes through the host
            log.info("GPU handoff from pid %d refused: %s: %s", pid, type(e).__name__, e)
            return None, None

    def close(self) -> None:
        self._closed = True
        for dest in list(self._out):
            self._drop(dest)
        for conn in list(self._inbound):  # the senders see the link end and use their nodes
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
            except OSError:
                pass
            self._listener.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

"""HTTP front-end worker processes (node config `http_workers: N`), as vLLM runs its API servers.

At 32 streaming requests on an H200 the node's trio thread was ~85% busy, ~40% of it in hypercorn's
send path (h11 and ASGI per SSE chunk), while the engine process waited for work (issue 12).  With
`http_workers: N` the node binds the `http` socket and hands it to N child processes
(`python -m hexswarm.api.http_worker`); each accepts connections on it and runs the same ASGI app
(`HttpApi`: parsing, validation, chat template, token check, SSE formatting), over a `RemoteBackend`
instead of the node's `LocalBackend`.  The node's event loop does no HTTP work.

The channel between a worker and its node is one Unix socketpair per worker process (no path; the child
inherits its end): length-prefixed msgpack frames (hexswarm.net.codec), each frame a LIST of messages.
Whoever writes queues messages and one writer task per end sends everything queued as one frame: on the
node, all token frames of all of a worker's requests produced while the previous write was in flight go
out in one write (about one per engine step per worker, not one per token per request).

Worker -> node messages (CHANNEL_VERSION 1):
  {"op": "hello", "version": 1, "pid": P, "call": C}             -> {"reply": C, "version": 1, "info": {...},
                                                                      "token": api_token or None}
  {"op": "serve", "rid": R, "kind": "chat"|"completions", "msg": <submit message>}
                                                                  -> {"rid": R, "frame": F} per frame `emit` got,
                                                                     then {"rid": R, "final": <done/error frame>}
                                                                     or {"rid": R, "failed": "<what>"} (an exception)
  {"op": "cancel", "rid": R}                                      (the HTTP client went away)
  {"op": "metrics", "call": C}                                    -> {"reply": C, "text": <Prometheus text>}
  {"op": "http", "route": ROUTE, "status": S}                     (one HTTP response, for the node's counter)
`info` is `LocalBackend.info()`: the model's name, id, length limit, chat template source and BOS/EOS.
The node runs each serve exactly as the in-process HTTP API does (`LocalBackend.serve`: EntryMetrics
around SubmitService.serve), so /metrics, cancellation and every error are the same.

Lifecycle: a worker exits when its channel closes (its node went away) or its parent pid changes; the
node restarts a worker that exits (one log line) and terminates its workers when it stops.  A worker
imports no torch: hypercorn, trio, msgpack and jinja2 (the chat template) only.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import sys
from pathlib import Path

import trio

from hexswarm.errors import ProtocolError, UserError
from hexswarm.net import codec
from hexswarm.runtime.heap import freeze_heap

log = logging.getLogger("hexswarm.http")

CHANNEL_VERSION = 1
MAX_FRAME = 1 << 28  # one frame holds many messages (a prompt may be 4 MiB); both ends are ours
BACKLOG = 1024  # connections the kernel queues while every worker is busy or (re)starting
START_TIMEOUT_S = 120.0  # a worker's hello (imports on a loaded machine)
RESTART_S, MAX_RESTART_S = 0.5, 10.0  # before a restart, doubling while workers die young
STOP_S = 3.0  # a stopping node waits this long for a worker to end after SIGTERM, then kills it


class ChannelClosed(Exception):
    """The other end of the channel went away."""


class Channel:
    """One end of a node <-> worker channel.  `put` queues a message; `write_loop` sends whatever is queued
    as one frame (a list) per write; `read_loop` hands each received message to a callback."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._out: list = []
        self._wake = trio.Event()
        self.closed = trio.Event()

    def put(self, msg: dict) -> None:
        self._out.append(msg)
        self._wake.set()

    async def write_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                batch, self._out = self._out, []
                await self.stream.send_all(_frame(batch))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.closed.set()

    async def read_loop(self, handle) -> None:
        """Call `handle(message)` for each message received, until the other end closes."""
        buf = bytearray()
        header = codec.FRAME_HEADER.size
        try:
            while True:
                data = await self.stream.receive_some(1 << 20)
                if not data:
                    return
                buf += data
                while len(buf) >= header:
                    n = codec.frame_length(bytes(buf[:header]), MAX_FRAME)
                    if len(buf) < header + n:
                        break
                    batch = codec.decode(bytes(buf[header:header + n]), MAX_FRAME)
                    del buf[:header + n]
                    for msg in batch if isinstance(batch, list) else ():
                        if isinstance(msg, dict):
                            handle(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        except ProtocolError as e:  # both ends are ours: a bug; this channel ends, the process goes on
            log.warning("HTTP worker channel: %s", e)
            return
        finally:
            self.closed.set()


def _frame(batch: list) -> bytes:
    """One frame of `batch`; a message that cannot be encoded is logged and, where it answers a request,
    replaced by that request's failure (so a bug fails one request, not the channel)."""
    try:
        return codec.frame(batch, MAX_FRAME)
    except ProtocolError:
        pass
    good = []
    for msg in batch:
        try:
            codec.encode(msg)
            good.append(msg)
        except ProtocolError as e:
            log.warning("HTTP worker channel: message not sent: %s", e)
            if isinstance(msg, dict) and "rid" in msg:
                good.append({"rid": msg["rid"], "failed": f"unencodable message: {e}"})
    return codec.frame(good, MAX_FRAME)


# --- the node's side ---------------------------------------------------------------------------------------


class WorkerLink:
    """The node's end of one worker's channel: runs the worker's requests through the node's LocalBackend."""

    def __init__(self, backend, token: str | None, channel: Channel, nursery: trio.Nursery):
        self.backend, self.token, self.channel, self.nursery = backend, token, channel, nursery
        self.scopes: dict[str, trio.CancelScope] = {}
        self.said_hello = False
        self.settled = trio.Event()  # said hello, or closed before it did

    def handle(self, msg: dict) -> None:
        op = msg.get("op")
        try:
            if op == "serve":
                self.nursery.start_soon(self._serve, str(msg["rid"]), str(msg["kind"]), msg["msg"])
            elif op == "cancel":
                scope = self.scopes.get(msg.get("rid"))
                if scope is not None:
                    scope.cancel()
            elif op == "http":
                self.backend.count_http(str(msg["route"]), int(msg["status"]))
            elif op == "metrics":
                self.nursery.start_soon(self._metrics, msg["call"])
            elif op == "hello":
                if msg.get("version") != CHANNEL_VERSION:
                    log.warning("HTTP worker %s speaks channel version %s, not %s", msg.get("pid"),
                                msg.get("version"), CHANNEL_VERSION)
                self.channel.put({"reply": msg["call"], "version": CHANNEL_VERSION, "info": self.backend.info(),
                                  "token": self.token})
                self.said_hello = True
                self.settled.set()
            else:
                log.warning("HTTP worker channel: unknown message %r", op)
        except (KeyError, TypeError, ValueError) as e:  # our own child's bug: one line, the channel goes on
            log.warning("HTTP worker channel: bad %r message: %s: %s", op, type(e).__name__, e)

    async def _serve(self, rid: str, kind: str, msg: dict) -> None:
        put = self.channel.put

        def put_frame(frame: dict) -> None:
            put({"rid": rid, "frame": frame})

        async def emit(frame: dict) -> None:
            put_frame(frame)

        answered = False
        with trio.CancelScope() as self.scopes[rid]:
            try:
                final = await self.backend.serve(msg, emit, kind, put_frame)
                answered = True
                put({"rid": rid, "final": final})
            except Exception as e:
                log.exception("HTTP worker request %s failed", rid)
                answered = True
                put({"rid": rid, "failed": f"{type(e).__name__}: {e}"})
            finally:
                self.scopes.pop(rid, None)
                if not answered:  # the worker's client went away, or the worker did
                    self.backend.cancel(rid)

    async def _metrics(self, call) -> None:
        self.channel.put({"reply": call, "text": await self.backend.metrics_text()})

    async def run(self) -> None:
        """Until the worker's end closes; then its requests are cancelled (their clients are gone with it)."""
        self.nursery.start_soon(self.channel.write_loop)
        await self.channel.read_loop(self.handle)
        self.settled.set()
        self.nursery.cancel_scope.cancel()


def worker_command(listen_fd: int, channel_fd: int) -> tuple[list[str], dict]:
    root = str(Path(__file__).resolve().parents[2])  # the hexswarm this node runs, whatever the cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "hexswarm.api.http_worker", "--listen-fd", str(listen_fd),
           "--channel-fd", str(channel_fd), "--parent", str(os.getpid()),
           "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel())]
    return cmd, env


async def _stop(proc) -> None:
    if proc.returncode is None:
        proc.terminate()
        with trio.move_on_after(STOP_S):
            await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def supervise(backend, token: str | None, listener: socket.socket, index: int, stopping=lambda: False, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Keep worker `index` running; started() once the first one said hello.  No restart once `stopping()`
    (a SIGTERM to the node's process group reaches its workers too)."""
    started = False
    delay = RESTART_S / 2
    while True:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd, env = worker_command(listener.fileno(), theirs.fileno())
        try:
            proc = await trio.lowlevel.open_process(cmd, env=env, pass_fds=(listener.fileno(), theirs.fileno()))
        finally:
            theirs.close()
        born = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                link = WorkerLink(backend, token, Channel(ours), nursery)
                nursery.start_soon(link.run)
                if not started:
                    with trio.move_on_after(START_TIMEOUT_S):
                        await link.settled.wait()
                    if link.said_hello:
                        started = True
                        task_status.started()
                    else:
                        nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await _stop(proc)
                ours.close()
        if not started:
            raise UserError(f"HTTP worker process {index} did not start (exit status {proc.returncode}; "
                            "see the lines above)")
        if stopping():
            await trio.sleep_forever()  # until the node's shutdown cancels us
        young = trio.current_time() - born < 30  # dying young again and again: wait longer each time
        delay = min(2 * delay, MAX_RESTART_S) if young else RESTART_S
        log.warning("HTTP worker %d (pid %d) exited with status %s; starting another in %.1f s", index, proc.pid,
                    proc.returncode, delay)
        await trio.sleep(delay)


async def serve_workers(backend, token: str | None, bind: str, workers: int, stopping=lambda: False, *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Bind `bind` here and serve it from `workers` worker processes until cancelled; started() with the URLs."""
    from hypercorn.utils import repr_socket_addr

    from hexswarm.api.http_api import hypercorn_config

    (listener,) = hypercorn_config(bind).create_sockets().insecure_sockets
    try:
        listener.listen(BACKLOG)  # connections wait in the kernel until a worker accepts them
        async with trio.open_nursery() as nursery:
            for i in range(workers):
                await nursery.start(supervise, backend, token, listener, i, stopping)
            task_status.started([f"http://{repr_socket_addr(listener.family, listener.getsockname())}"])
    finally:
        listener.close()


# --- the worker's side -------------------------------------------------------------------------------------


class RemoteBackend:
    """HttpApi's backend in a worker process: the node's LocalBackend, reached over the channel."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.requests: dict[str, trio.MemorySendChannel] = {}  # rid -> its frames
        self.calls: dict[int, list] = {}  # call number -> [event, reply]
        self._calls = 0

    async def start(self) -> str | None:
        """Say hello; take the model's facts from the node's answer.  Returns the API token."""
        from hexswarm.runtime.chat import ChatTemplate

        reply = await self.call({"op": "hello", "version": CHANNEL_VERSION, "pid": os.getpid()})
        if reply.get("version") != CHANNEL_VERSION:
            raise UserError(f"the node speaks HTTP worker channel version {reply.get('version')}, "
                            f"this worker {CHANNEL_VERSION}")
        info = reply["info"]
        self.created = info["created"]
        self.model_name = info["model_name"]
        self.model_id = info["model_id"]
        self.max_seq_len = info["max_seq_len"]
        self.chat = ChatTemplate(*info["chat"]) if info["chat"] is not None else None
        self.strip_bos = info["strip_bos"]
        return reply["token"]

    async def call(self, msg: dict) -> dict:
        self._calls += 1
        number = self._calls
        slot = self.calls[number] = [trio.Event(), None]
        self.channel.put({**msg, "call": number})
        try:
            await slot[0].wait()
        finally:
            self.calls.pop(number, None)
        if slot[1] is None:
            raise ChannelClosed("the node closed the channel")
        return slot[1]

    def deliver(self, msg: dict) -> None:
        """One message from the node: a call's reply, or a frame of a request."""
        if "reply" in msg:
            slot = self.calls.get(msg["reply"])
            if slot is not None:
                slot[1] = msg
                slot[0].set()
            return
        send = self.requests.get(msg.get("rid"))
        if send is not None:  # else a frame of a request given up on: dropped
            send.send_nowait(msg)

    def fail_all(self) -> None:
        """The channel closed: every waiting call and request fails."""
        for slot in list(self.calls.values()):
            slot[0].set()
        for rid, send in list(self.requests.items()):
            send.send_nowait({"rid": rid, "failed": "the node closed the channel"})

    async def serve(self, msg: dict, emit, kind: str) -> dict:
        rid = msg["request_id"]
        send, receive = trio.open_memory_channel(math.inf)
        self.requests[rid] = send
        self.channel.put({"op": "serve", "rid": rid, "kind": kind, "msg": msg})
        done = False
        try:
            while True:
                last = await receive.receive()
                frames = []
                while "frame" in last:  # everything that arrived for this request: one HTTP write of its tokens
                    frames.append(last["frame"])
                    try:
                        last = receive.receive_nowait()
                    except trio.WouldBlock:
                        last = None
                        break
                await _emit_merged(emit, frames)
                if last is None:
                    continue
                done = True
                if "final" in last:
                    return last["final"]
                raise RuntimeError(f"the node failed request {rid}: {last.get('failed')}")
        finally:
            del self.requests[rid]
            if not done:  # cancelled (the client went away) or the channel closed: the node stops its work
                self.channel.put({"op": "cancel", "rid": rid})

    def cancel(self, rid: str) -> None:
        """Nothing left to do: `serve`, cancelled, already told the node (which cancels and logs it)."""

    async def metrics_text(self) -> str:
        return (await self.call({"op": "metrics"}))["text"]

    def count_http(self, route: str, status: int) -> None:
        self.channel.put({"op": "http", "route": route, "status": status})


async def _emit_merged(emit, frames: list[dict]) -> None:
    """Hand `frames` to `emit`, consecutive token frames as one {"batch": [...]} (the Responder writes a
    batch as one SSE chunk)."""
    run: list[dict] = []
    for f in frames:
        if "token" in f or "batch" in f:
            run += f.get("batch") or [f]
            continue
        if run:
            await emit(run[0] if len(run) == 1 else {"batch": run})
            run = []
        await emit(f)
    if run:
        await emit(run[0] if len(run) == 1 else {"batch": run})


async def _watch_parent(parent: int, scope: trio.CancelScope) -> None:
    while os.getppid() == parent:
        await trio.sleep(1.0)
    log.warning("HTTP worker %d: the node (pid %d) went away; exiting", os.getpid(), parent)
    scope.cancel()


async def _worker(listen_fd: int, channel_fd: int, parent: int) -> None:
    from hypercorn.trio import serve

    from hexswarm.api.http_api import HttpApi, hypercorn_config

    channel = Channel(socket.socket(fileno=channel_fd))
    backend = RemoteBackend(channel)

    async def read() -> None:
        await channel.read_loop(backend.deliver)
        backend.fail_all()
        nursery.cancel_scope.cancel()  # the node went away: so does this worker

    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.write_loop)
        nursery.start_soon(read)
        nursery.start_soon(_watch_parent, parent, nursery.cancel_scope)
        token = await backend.start()
        freeze_heap()  # a long-lived server: its start-up heap out of the collector's full passes (runtime/heap.py)
        cfg = hypercorn_config(f"fd://{listen_fd}")
        cfg.errorlog = logging.getLogger("hexswarm.http.worker")  # its errors; not N "Running on" lines
        cfg.errorlog.setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
        await serve(HttpApi(backend, token), cfg, mode="asgi")


def main(argv: list[str] | None = None) -> None:
    from hexswarm.logformat import log_to_stderr

    ap = argparse.ArgumentParser(description="an HTTP front-end worker of a hexswarm node (started by the node)")
    ap.add_argument("--listen-fd", type=int, required=True)
    ap.add_argument("--channel-fd", type=int, required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    log_to_stderr(a.log_level)
    try:
        trio.run(_worker, a.listen_fd, a.channel_fd, a.parent)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

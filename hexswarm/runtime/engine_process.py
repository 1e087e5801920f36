"""A stage engine in its own process, fed over a local pipe (as vLLM runs its engine core).

In one process the engine thread and the trio thread (network, HTTP, per-token relays) share
the GIL: measured on an H100 at 64 concurrent streams, the trio thread was busy ~80% of the
time and every decode step waited for the GIL (docs/DECISIONS.md).  Here the engine runs in a
child process with the whole of its own interpreter; the node process keeps the network.

`EngineProcess` has the interface the serving layer uses of a `StageEngine`: submit, close,
spec, in_flight, spans, error, admit_limit, kv_limit.  Messages cross the pipe as codec frames (msgpack,
tensors as raw bytes, no pickle).  The child reports its state (requests held, spans of the
requests it touched, a failure) every STATE_S, and exits when its parent goes away.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass

from hexswarm.logformat import log_to_stderr  # a node's log lines, as cli/node_cmd.py
from hexswarm.net import codec
from hexswarm.runtime.cpus import engine_threads
from hexswarm.runtime.heap import freeze_heap
from hexswarm.runtime.local_link import LinkSpec
from hexswarm.runtime.spans import SpanLog
from hexswarm.runtime.stage_engine import EngineSettings, PipelineRoute, Send
from hexswarm.runtime.stage_host import StageSpec

log = logging.getLogger(__name__)

STATE_S = 0.2
MAX_FRAME = 1 << 34
START_TIMEOUT_S = 600.0  # loading a large shard from a slow disk


@dataclass(frozen=True)
class EngineJob:
    spec: StageSpec
    tag: str
    route: PipelineRoute
    settings: EngineSettings
    name: str
    with_tokenizer: bool
    parent: int
    links: LinkSpec | None = None
    log_level: int = logging.WARNING  # the child's lines go to the node's log as the node's own do
    freeze_heap: bool = True  # exempt the loaded heap from full collector passes (runtime/heap.py)
    threads: int = 0  # torch intra-op threads (runtime/cpus.py engine_threads; 0: its default)


class ChildLimit:
    """A limit the serving layer sets on a stage engine (`admit_limit`, `kv_limit`): kept here, and
    written to the child's engine when it changes."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else obj._limits[self.name]

    def __set__(self, obj, n: int) -> None:
        if n != obj._limits[self.name]:
            obj._limits[self.name] = n
            obj._write({"kind": "_limit", "name": self.name, "n": int(n)})


class EngineProcess:
    def __init__(self, job: EngineJob, send: Send):
        self.spec = job.spec
        self.spans = SpanLog()
        self.error: BaseException | None = None
        self._send = send
        self._in_flight = 0
        self.last_message_at = time.monotonic()  # the child's, reported (CLOCK_MONOTONIC is system-wide)
        self._limits = {"admit_limit": job.spec.max_batch, "kv_limit": 0}  # as the child's engine starts
        ctx = mp.get_context("spawn")  # no CUDA state or trio loop is inherited
        self._conn, child = ctx.Pipe(duplex=True)
        self._lock = threading.Lock()
        self._proc = ctx.Process(target=_child_main, args=(child, job), name=job.name, daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(START_TIMEOUT_S):
            self._proc.kill()
            raise RuntimeError(f"stage engine {job.name} did not start in {START_TIMEOUT_S:g} s")
        first = self._recv()
        if first is None or first.get("kind") != "_ready":
            self._proc.join(5)
            raise RuntimeError(f"stage engine {job.name} failed to start: {(first or {}).get('error', 'it exited')}")
        self._reader = threading.Thread(target=self._read, name=f"{job.name}-reader", daemon=True)

    # ---- the StageEngine interface ------------------------------------------------------
    def start(self) -> None:
        self._reader.start()

    def submit(self, msg: dict) -> None:
        self._write(msg)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    admit_limit = ChildLimit()
    kv_limit = ChildLimit()

    def close(self) -> None:
        self._write({"kind": "close"})
        self._proc.join(15)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()

    # ---- the pipe ----------------------------------------------------------------------
    def _write(self, msg: dict) -> None:
        try:
            with self._lock:
                self._conn.send_bytes(codec.encode(msg))
        except (OSError, ValueError) as e:  # the child is gone: the serving layer fails requests over
            self.error = self.error or RuntimeError(f"stage engine process unreachable: {e}")

    def _recv(self) -> dict | None:
        try:
            return codec.decode(self._conn.recv_bytes(), MAX_FRAME, tensors=True)
        except (EOFError, OSError):
            return None

    def _read(self) -> None:
        while True:
            m = self._recv()
            if m is None:
                self.error = self.error or RuntimeError(f"stage engine process exited ({self._proc.exitcode})")
                self._in_flight = 0
                return
            if m.get("kind") == "_state":
                self._in_flight = int(m["in_flight"])
                self.last_message_at = float(m["last_message_at"])
                for rid, span in m["spans"].items():
                    self.spans.put(rid, span)
                if m.get("error") and self.error is None:
                    self.error = RuntimeError(m["error"])
                continue
            try:
                self._send(m["peer"], m["msg"])
            except Exception as e:  # one bad message must not end the reader
                log.warning("stage engine output not sent: %s: %s", type(e).__name__, e)


# ---- the child ---------------------------------------------------------------------------

def _child_main(conn, job: EngineJob) -> None:
    from hexswarm.runtime.tp_follower import exit_with_parent

    exit_with_parent(job.parent)
    log_to_stderr(job.log_level)
    lock = threading.Lock()

    def write(obj: dict) -> None:
        data = codec.encode(obj)
        with lock:
            conn.send_bytes(data)

    try:
        engine = _build(job, lambda peer, msg: write({"peer": peer, "msg": msg}))
        engine.start()
        engine.wait_loaded()  # loaded in the engine's own thread (StageEngine._load)
    except BaseException as e:
        write({"kind": "_failed", "error": f"{type(e).__name__}: {e}"})
        return
    if job.freeze_heap:
        freeze_heap()
    write({"kind": "_ready"})

    def report() -> None:
        while True:
            time.sleep(STATE_S)
            write({"kind": "_state", "in_flight": engine.in_flight, "last_message_at": engine.last_message_at,
                   "spans": engine.spans.take_updates(),
                   "error": None if engine.error is None else f"{type(engine.error).__name__}: {engine.error}"})

    threading.Thread(target=report, daemon=True).start()
    while True:
        try:
            msg = codec.decode(conn.recv_bytes(), MAX_FRAME, tensors=True)
        except (EOFError, OSError):
            msg = {"kind": "close"}
        if msg.get("kind") == "_limit" and msg.get("name") in ("admit_limit", "kv_limit"):
            setattr(engine, msg["name"], msg["n"])
            continue
        if msg.get("kind") == "close":
            engine.close()
            os._exit(0)
        engine.submit(msg)


def _build(job: EngineJob, send: Send):
    import torch

    from hexswarm.model.config import LlamaConfig
    from hexswarm.runtime.stage_engine import StageEngine
    from hexswarm.runtime.stage_host import StageHost
    from hexswarm.runtime.tokenizer import TextTokenizer

    torch.set_num_threads(engine_threads(job.threads))
    host = StageHost(job.spec, tag=job.tag)  # loaded by the engine's thread
    tokenizer = TextTokenizer(job.spec.model_dir, LlamaConfig.from_dir(job.spec.model_dir)) if job.with_tokenizer else None
    return StageEngine(host, job.route, send, tokenizer, job.name, job.settings, job.links)

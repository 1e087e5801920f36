"""Weights from peers: `/hexswarm/weights/1`, served by every node that holds a safetensors checkpoint,
and the fetch of a node started without one (`model_source: swarm`).

Requests (one per stream, the usual envelope):

- ``{"manifest": fingerprint}`` -> the holder's manifest (manifest.py) sealed with its node key;
- ``{"blocks": [32-byte sha256, ...]}`` (at most 64, and at most 8 MiB of blocks) -> ``{"data": [bytes, ...]}``,
  the blocks' bytes from the holder's files, in order (several per request: one round trip per batch).

The fetcher takes the manifest most holders agree on (checked: well formed, bound to the model
fingerprint through config.json's hash), then asks holders for the blocks of the side files and, per
stage it is given, of that stage's tensors only, several at a time from every holder.  Each block is
hashed on arrival; a holder whose block fails is not asked again, and the block goes to another.
Verified blocks are kept on disk (weight_cache.py), so a fetch cut short resumes where it stopped.
Why not bitswap: docs/net.md (py-libp2p 0.8.1's client stores whatever blocks any peer pushes and
cannot say which peer sent a bad one).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import trio

from hexswarm.errors import ProtocolError, UserError
from hexswarm.model.manifest import (BLOCK_SIZE, MANIFEST_DOMAIN, MAX_MANIFEST_BYTES, Where, build_manifest,
                                     check_manifest, stage_tensors)
from hexswarm.model.weight_cache import WeightCache, load_saved_manifest
from hexswarm.net import codec
from hexswarm.net.error_codes import ErrorCode
from hexswarm.net.protocols import WEIGHTS, RemoteError, RequestError
from hexswarm.net.signed import open_sealed, seal

log = logging.getLogger("hexswarm.weights")

PER_HOLDER = 2  # block requests in flight to one holder
MAX_FAILS = 3  # consecutive failed requests before a holder is left out of this round
BLOCK_TIMEOUT_S = 60.0
MAX_BATCH = 64  # blocks in one request
BATCH_BYTES = 8 << 20  # and at most this many bytes of them (the reply frame stays small)
# Test hooks (never set in production): the N-th block this holder serves has a byte flipped;
# holders cut blocks of this size (small checkpoints then have tensors of several blocks).
CORRUPT_ENV = "HEXSWARM_TEST_CORRUPT_BLOCK"
BLOCK_BYTES_ENV = "HEXSWARM_TEST_BLOCK_BYTES"


def read_weights_request(msg: Any) -> tuple[str, Any]:
    """("manifest", fingerprint) or ("blocks", [digest, ...]) from a request; ProtocolError otherwise."""
    if isinstance(msg, dict) and len(msg) == 1:
        if isinstance(msg.get("manifest"), str) and len(msg["manifest"]) <= 64:
            return "manifest", msg["manifest"]
        blocks = msg.get("blocks")
        if (isinstance(blocks, list) and 0 < len(blocks) <= MAX_BATCH
                and all(isinstance(d, bytes) and len(d) == 32 for d in blocks)):
            return "blocks", blocks
    raise ProtocolError(f"expected {{manifest: fingerprint}} or {{blocks: [1 to {MAX_BATCH} 32-byte digests]}}")


def servable(model_dir: Path) -> bool:
    """Can this checkpoint be served block by block (a HF folder with safetensors)?"""
    return (model_dir / "model.safetensors").is_file() or (model_dir / "model.safetensors.index.json").is_file()


class WeightServer:
    """Answers manifest and block requests from this node's checkpoint."""

    def __init__(self, node, model_dir: Path, fingerprint: str):
        self.node = node
        self.model_dir = Path(model_dir)
        self.fingerprint = fingerprint
        self._sealed: dict | None = None
        self._index: dict[bytes, Where] = {}
        self._lock = trio.Lock()
        self._served = 0
        corrupt = os.environ.get(CORRUPT_ENV)
        self._corrupt_at = int(corrupt) if corrupt else None
        self._block_size = int(os.environ.get(BLOCK_BYTES_ENV) or BLOCK_SIZE)

    def register(self) -> None:
        self.node.register_handler(WEIGHTS, self._on_request, max_request=1024, rate_per_peer=400.0,
                                   max_reply=MAX_MANIFEST_BYTES + (1 << 20))
        self.node.extra["weights"] = 1  # in the record: fetchers look for holders of their model

    async def _manifest(self) -> dict:
        async with self._lock:  # built once, on first request (it hashes the whole checkpoint)
            if self._sealed is None:
                manifest, self._index = await trio.to_thread.run_sync(
                    build_manifest, self.model_dir, self.fingerprint, self._block_size)
                self._sealed = seal(manifest, self.node.identity, MANIFEST_DOMAIN)
                log.info("weights manifest of %s: %d tensors, %d blocks", self.model_dir, len(manifest["tensors"]),
                         len(self._index))
        return self._sealed

    async def _on_request(self, msg: Any, remote: Any) -> Any:
        kind, arg = read_weights_request(msg)
        if kind == "manifest":
            if arg != self.fingerprint:
                raise RemoteError(ErrorCode.NOT_FOUND, "this node serves another model")
            return await self._manifest()
        await self._manifest()
        wheres = [self._index.get(d) for d in arg]
        if None in wheres:
            raise RemoteError(ErrorCode.NOT_FOUND, "no such block")
        if sum(w.length for w in wheres) > BATCH_BYTES + self._block_size:
            raise RemoteError(ErrorCode.BAD_REQUEST, f"more than {BATCH_BYTES} bytes of blocks in one request")
        data = await trio.to_thread.run_sync(_read, wheres)
        for i, d in enumerate(arg):
            if self._corrupt_at is not None and self._served == self._corrupt_at:
                data[i] = bytes([data[i][0] ^ 0xFF]) + data[i][1:]
                log.warning("test hook: serving block %s corrupted", d.hex()[:12])
            self._served += 1
        return {"data": data}


def _read(wheres: list[Where]) -> list[bytes]:
    out = []
    for w in wheres:
        with open(w.path, "rb") as f:
            f.seek(w.offset)
            out.append(f.read(w.length))
    return out


class WeightFetcher:
    """Fetches the checkpoint of model `fingerprint` from peers into `root`, stage by stage."""

    def __init__(self, node, fingerprint: str, root: Path, stall_s: float = 120.0):
        self.node = node
        self.fingerprint = fingerprint
        self.root = Path(root)
        self.stall_s = stall_s  # give up when no block arrived this long
        self.cache: WeightCache | None = None
        self.banned: set[str] = set()  # holders that served a block failing its hash
        self.served: Counter[str] = Counter()  # good blocks per holder (logged, tested)
        self._lock = trio.Lock()

    def holders(self) -> list[str]:
        me = self.node.peer_id_str
        return [e.peer_id for e in self.node.table.up()
                if e.peer_id != me and e.peer_id not in self.banned
                and e.record.extra.get("model") == self.fingerprint and e.record.extra.get("weights")]

    async def prepare(self) -> Path:
        """The manifest and the side files (config, tokenizer): enough to join as a server."""
        self.root.mkdir(parents=True, exist_ok=True)
        manifest, body = await self._manifest()
        self.cache = WeightCache(self.root, manifest)
        self.cache.save_manifest(body)
        await self._fetch(self.cache.blocks_of(self.cache.missing_files(), []), "model files")
        await trio.to_thread.run_sync(self.cache.write_files)
        return self.root

    async def ensure_stage(self, layer_start: int, layer_end: int, first: bool, last: bool, tied: bool) -> None:
        """Fetch (once) the tensors a stage of layers [layer_start, layer_end) reads."""
        async with self._lock:
            names = stage_tensors(list(self.cache.manifest["tensors"]), layer_start, layer_end, first, last, tied)
            missing = self.cache.missing_tensors(names)
            if not missing:
                return
            await self._fetch(self.cache.blocks_of([], missing), f"layers {layer_start}-{layer_end - 1}")
            await trio.to_thread.run_sync(self.cache.write_tensors, missing)

    # ---- the manifest ----------------------------------------------------------------------
    def _check(self, body: bytes) -> dict:
        return check_manifest(codec.decode(body, MAX_MANIFEST_BYTES), self.fingerprint)

    async def _manifest(self) -> tuple[dict, bytes]:
        saved = load_saved_manifest(self.root, MAX_MANIFEST_BYTES)
        if saved is not None:
            try:
                return self._check(saved), saved  # resuming: the manifest this fetch began with
            except ProtocolError as e:
                log.warning("saved manifest in %s is not usable (%s): asking peers again", self.root, e)
        deadline = time.monotonic() + self.stall_s
        while True:
            votes: dict[bytes, list[str]] = {}
            for peer, body in await self._ask_manifests(self.holders()):
                votes.setdefault(body, []).append(peer)
            ranked = sorted(votes.items(), key=lambda kv: -len(kv[1]))
            if ranked and (len(ranked) == 1 or len(ranked[0][1]) > len(ranked[1][1])):
                body, peers = ranked[0]
                log.info("weights manifest of model %s from %d holder(s)%s", self.fingerprint, len(peers),
                         f"; {sum(len(p) for _, p in ranked[1:])} disagreed" if len(ranked) > 1 else "")
                return self._check(body), body
            if time.monotonic() > deadline:
                what = "holders disagree on its manifest" if ranked else "no peer holding it answered"
                raise UserError(f"cannot fetch model {self.fingerprint} from peers: {what} within {self.stall_s:g} s")
            log.info("waiting for peers holding model %s (%s)", self.fingerprint,
                     "tie between manifests" if ranked else "none yet")
            await trio.sleep(2.0)

    async def _ask_manifests(self, peers: list[str]) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []

        async def ask(peer: str) -> None:
            try:
                sealed = await self.node.request(peer, WEIGHTS, {"manifest": self.fingerprint}, timeout=60.0,
                                                 max_reply=MAX_MANIFEST_BYTES + (1 << 20))
                obj, signer = open_sealed(sealed, MANIFEST_DOMAIN, MAX_MANIFEST_BYTES)
                if signer != peer:
                    raise ProtocolError(f"manifest signed by {signer}")
                check_manifest(obj, self.fingerprint)
                out.append((peer, sealed["body"]))
            except (RequestError, ProtocolError) as e:
                log.warning("manifest from %s refused: %s", peer, e)

        async with trio.open_nursery() as nursery:
            for p in peers:
                nursery.start_soon(ask, p)
        return out

    # ---- blocks ----------------------------------------------------------------------------
    async def _fetch(self, blocks: list[tuple[bytes, int]], what: str) -> None:
        cache = self.cache
        todo = deque([b for b in blocks if not await trio.to_thread.run_sync(cache.has_block, b[0])])
        total = sum(size for _, size in todo)
        kept = len(blocks) - len(todo)
        if not todo:
            return
        log.info("fetching %s of model %s: %d blocks (%.1f MiB)%s", what, self.fingerprint, len(todo),
                 total / 2**20, f", {kept} already on disk" if kept else "")
        start = time.monotonic()
        before = Counter(self.served)
        last_progress = [time.monotonic()]
        with _progress(what, total) as advance:
            async def worker(peer: str, fails: Counter, share: int) -> None:
                while todo and peer not in self.banned and fails[peer] < MAX_FAILS:
                    batch = [todo.popleft()]
                    while todo and len(batch) < share and sum(n for _, n in batch) + todo[0][1] <= BATCH_BYTES:
                        batch.append(todo.popleft())
                    try:
                        reply = await self.node.request(peer, WEIGHTS, {"blocks": [d for d, _ in batch]},
                                                        timeout=BLOCK_TIMEOUT_S,
                                                        max_reply=sum(n for _, n in batch) + 64 * len(batch) + 1024)
                    except RequestError as e:
                        fails[peer] += 1
                        todo.extend(batch)
                        log.debug("blocks from %s: %s", peer, e)
                        continue
                    data = reply.get("data") if isinstance(reply, dict) else None
                    if not (isinstance(data, list) and len(data) == len(batch)):
                        data = [None] * len(batch)
                    for i, ((d, size), block) in enumerate(zip(batch, data)):
                        ok = isinstance(block, bytes) and len(block) == size and \
                            await trio.to_thread.run_sync(cache.put_block, d, block)
                        if not ok:
                            todo.extend(batch[i:])
                            if peer not in self.banned:
                                self.banned.add(peer)
                                log.warning("peer %s served block %s that fails its hash: not asked again", peer,
                                            d.hex()[:12])
                            return
                        self.served[peer] += 1
                        last_progress[0] = time.monotonic()
                        advance(size)
                    fails[peer] = 0

            while todo:
                holders = self.holders()
                if holders:
                    fails: Counter = Counter()
                    # batches no larger than a fair share, so that every holder gets some
                    share = min(MAX_BATCH, -(-len(todo) // (2 * len(holders) * PER_HOLDER)))
                    async with trio.open_nursery() as nursery:
                        for peer in holders:
                            for _ in range(PER_HOLDER):
                                nursery.start_soon(worker, peer, fails, share)
                if todo:
                    if time.monotonic() - last_progress[0] > self.stall_s:
                        raise UserError(f"cannot fetch {what} of model {self.fingerprint}: no block arrived in "
                                        f"{self.stall_s:g} s (holders: {len(self.holders())}, "
                                        f"refused for bad blocks: {len(self.banned)})")
                    await trio.sleep(1.0)
        got = {p: n - before[p] for p, n in self.served.items() if n > before[p]}
        log.info("fetched %s of model %s: %.1f MiB in %.1f s, blocks per peer %s, refused peers %s", what,
                 self.fingerprint, total / 2**20, time.monotonic() - start, got, sorted(self.banned))


class _progress:
    """A rich progress bar on stderr when it is a terminal (a log line at start and end otherwise)."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, total
        self.bar = None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

            self.bar = Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                console=Console(stderr=True), transient=True)
            self.bar.start()
            task = self.bar.add_task(f"fetching {self.what}", total=self.total)
            return lambda n: self.bar.advance(task, n)
        return lambda n: None

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


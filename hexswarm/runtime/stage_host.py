"""One stage of a served pipeline on this host, across its TP ranks: the leader shard in this process
and, for TP > 1, one follower process per extra rank, joined by a standalone gloo/NCCL process group
(several stages can live in one process, e.g. during a layout change).

Every rank runs a `StageExecutor`.  An op is a dict: {"op": "forward", "rows": [[slot, start, length], ...],
"x": hidden [N, H], "free": [slot, ...]} where the rows' new tokens lie back to back in x (the first stage's
leader may pass "ids", N token ids, instead of "x") and "free" (optional) names slots whose requests ended:
their KV blocks go back to the pool before the rows get theirs; or {"op": "stop"}.  The leader broadcasts each
op to its TP group (its header in the wire codec, no pickle; activations as tensors), so followers run the
same op in the same order; activations never go to ranks that do not need them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch

from hexswarm.model.config import LlamaConfig
from hexswarm.model.host_copy import to_device
from hexswarm.model.kv_cache import KVCache
from hexswarm.model.shard import TensorShard
from hexswarm.model.source import open_checkpoint
from hexswarm.model.stage import DTYPES, StageModel, StagePart, load_stage
from hexswarm.net import codec
from hexswarm.net.ports import free_port

# Setting a group up (followers start, load and connect) must finish within this.
SETUP_TIMEOUT = datetime.timedelta(minutes=10)
# A collective's timeout is also how long an idle follower waits for its leader's next op, so an
# idle stage must not hit it: effectively unbounded.  A follower that exits is caught by
# followers_alive before every op instead (and a closed gloo socket fails a pending collective).
OP_TIMEOUT = datetime.timedelta(days=365)


# ---- one rank: its ops, and the leader's broadcast of them to the group ----------------------------

Rows = list[tuple[int, int, int]]


class TensorParallelGroup:
    """The ranks of one stage; local rank 0 is the leader.  `pg` is a torch ProcessGroup.

    `device` is where the group's messages live: NCCL only moves CUDA tensors, so a group on
    CUDA sends its op headers and activations as CUDA tensors (gloo takes either)."""

    def __init__(self, pg, device: torch.device | str = "cpu"):
        self.pg = pg
        self.device = torch.device(device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.pg.allreduce([t]).wait()
        return t

    def broadcast_op(self, op: dict | None, x: torch.Tensor | None = None, dtype: torch.dtype | None = None):
        """Leader: send (op, x); followers (op=None) get them.  x travels as a tensor of `dtype`
        on the group's device, not through the codec."""
        header = None if op is None else {**op, "x_shape": None if x is None else list(x.shape)}
        header = broadcast_obj(header, self.pg, self.device)
        shape = header.pop("x_shape")
        if shape is None:
            return header, None
        if x is None:
            x = torch.empty(shape, dtype=dtype, device=self.device)
        else:
            x = x.to(self.device, dtype).contiguous()
        self.pg.broadcast(x, 0).wait()
        return header, x


class StageExecutor:
    def __init__(self, model: StageModel, kv: KVCache, tp: TensorParallelGroup | None = None,
                 capture_graphs: bool = False):
        self.model = model
        self.kv = kv
        self.tp = tp
        # Steps of a single-rank CUDA stage replay captured CUDA graphs (decode steps, and steps
        # mixing decode rows with prompt chunks up to a token bucket); a TP stage
        # would need its all-reduce captured too, which the standalone groups here do not do.
        self.graphs = model.step_graphs(kv) if tp is None and torch.device(model.device).type == "cuda" else None
        if self.graphs is not None and capture_graphs:
            self.graphs.capture_all()
            self._warm_up_eager()

    def _warm_up_eager(self) -> None:
        """One eager mixed step on the scratch slot (a decode row and a prompt chunk), so the
        kernels of eager steps are compiled at load, not while a request waits."""
        kv = self.kv
        rows = [(kv.scratch_slot, 0, 1), (kv.scratch_slot, 1, 3)]
        with torch.inference_mode():
            if self.model.embedding is not None:
                x = self.model.embed(torch.zeros(4, dtype=torch.long, device=self.model.device))
            else:
                x = torch.zeros(4, self.model.cfg.hidden_size, dtype=self.model.dtype, device=self.model.device)
            self._forward(rows, x)
            torch.cuda.synchronize(self.model.device)

    @torch.inference_mode()
    def lead(self, op: dict) -> torch.Tensor | None:
        """Leader: run op on the whole TP group.  Returns hidden [N, H], or on the last stage
        float32 logits [R, V] of every row's last token."""
        if op["op"] == "stop":
            if self.tp is not None:
                self.tp.broadcast_op({"op": "stop"})
            return None
        rows, ids, x = forward_rows(op)
        free = [int(s) for s in op.get("free") or ()]
        self.kv.release(free)
        if self.graphs is not None:
            out = self.graphs.run(torch.as_tensor(ids, dtype=torch.long) if ids is not None else x, rows)
            if out is not None:
                return out
        if ids is not None:
            x = self.model.embed(torch.as_tensor(ids, dtype=torch.long, device=self.model.device))
        if self.tp is not None:
            _, x = self.tp.broadcast_op({"op": "forward", "rows": rows, "free": free}, x, self.model.dtype)
        return self._forward(rows, x)

    @torch.inference_mode()
    def follow(self) -> None:
        """Follower: run the leader's ops until it says stop."""
        while True:
            op, x = self.tp.broadcast_op(None, dtype=self.model.dtype)
            if op["op"] == "stop":
                return
            self.kv.release(op.get("free") or ())  # the leader's frees, so every rank's blocks stay alike
            self._forward([tuple(r) for r in op["rows"]], x)

    def _forward(self, rows: Rows, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.model.device, self.model.dtype)
        h = self.model.forward_rows(x, self.kv, rows, self.tp.all_reduce if self.tp else None)
        if self.model.lm_head is None:
            return h
        last = [0] * len(rows)
        end = 0
        for i, r in enumerate(rows):
            end += r[2]
            last[i] = end - 1
        if end != len(rows):  # some row has several tokens: keep each row's last
            h = h.index_select(0, to_device(last, torch.long, h.device))
        return self.model.logits(h)


def forward_rows(op: dict) -> tuple[Rows, list[int] | torch.Tensor | None, torch.Tensor | None]:
    """(rows, flat ids (a list, or a long tensor already on the device) or None, flat hidden [N, H] or None)."""
    ids = op.get("ids")
    if ids is not None and not isinstance(ids, torch.Tensor):
        ids = list(ids)
    return [(int(s), int(p), int(n)) for s, p, n in op["rows"]], ids, op.get("x")


def broadcast_obj(obj: Any, pg, device: torch.device | str = "cpu") -> Any:
    """Broadcast from the group's local rank 0 (the stage leader) over process group `pg`.

    The leader passes obj; the others pass None and get it.  `pg` is a ProcessGroup: from
    dist.new_group, or built standalone from a store.  The bytes travel as tensors on
    `device`: a CUDA device for an NCCL group (NCCL moves no CPU tensors), CPU for gloo.
    """
    device = torch.device(device)
    if pg.rank() == 0:
        data = codec.encode(obj)
        pg.broadcast(torch.tensor([len(data)], dtype=torch.int64, device=device), 0).wait()
        pg.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device), 0).wait()
        return obj
    n = torch.empty(1, dtype=torch.int64, device=device)
    pg.broadcast(n, 0).wait()
    buf = torch.empty(int(n[0]), dtype=torch.uint8, device=device)
    pg.broadcast(buf, 0).wait()
    return codec.decode(buf.cpu().numpy().tobytes(), max_size=1 << 40, tensors=True)


# ---- the stage on this host: spec, group, followers ------------------------------------------------

@dataclass(frozen=True)
class StageSpec:
    """What a host serves for one pipeline stage."""

    model_dir: str
    layer_start: int
    layer_end: int
    tp: int
    is_first: bool
    is_last: bool
    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int = 8
    max_seq_len: int = 512
    gpus: tuple[int, ...] = ()  # CUDA ordinal of each TP rank; () means 0..tp-1
    quantize: str | None = None  # None, "none", "int8", "int4" (see load_stage)
    kv_tokens: int = 0  # the paged KV cache's capacity in positions; 0: max_batch x max_seq_len

    def device_of(self, tp_rank: int) -> torch.device:
        if self.device == "cuda":
            return torch.device("cuda", self.gpus[tp_rank] if self.gpus else tp_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def part(self, cfg: LlamaConfig, tp_rank: int) -> StagePart:
        leader = tp_rank == 0
        return StagePart(self.layer_start, self.layer_end, TensorShard.for_rank(cfg, self.tp, tp_rank),
                         with_embedding=leader and self.is_first, with_head=leader and self.is_last)

    def to_args(self) -> list[str]:
        return [
            "--model", self.model_dir, "--layers", str(self.layer_start), str(self.layer_end), "--tp", str(self.tp),
            "--device", self.device, "--dtype", self.dtype, "--max-batch", str(self.max_batch),
            "--max-seq-len", str(self.max_seq_len),
        ] + (["--first"] if self.is_first else []) + (["--last"] if self.is_last else []) + (
            ["--gpus", *map(str, self.gpus)] if self.gpus else []) + (
            ["--quantize", self.quantize] if self.quantize else []) + (
            ["--kv-tokens", str(self.kv_tokens)] if self.kv_tokens else [])


def make_group(device: str, store_port: int, tag: str, rank: int, size: int, is_master: bool):
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", store_port, size, is_master, timeout=SETUP_TIMEOUT)
    prefixed = dist.PrefixStore(tag, store)
    if device == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = OP_TIMEOUT  # NCCL's watchdog would otherwise abort an idle follower's wait
        return dist.ProcessGroupNCCL(prefixed, rank, size, options), store
    return dist.ProcessGroupGloo(prefixed, rank, size, OP_TIMEOUT), store


def build_executor(spec: StageSpec, tp_rank: int, pg, capture_graphs: bool = False,
                   show_progress: bool = False) -> StageExecutor:
    """Load this rank's shard and its KV cache.  capture_graphs: capture every CUDA graph now (decode
    and mixed-step buckets; a server), so no request waits on a capture later.  show_progress: a
    progress bar while the shard loads."""
    cfg = LlamaConfig.from_dir(spec.model_dir)
    device = spec.device_of(tp_rank)
    on_device = contextlib.nullcontext()
    if device.type == "cuda":
        # Triton kernels and CUDA graph captures run on the current device, not their tensors'.  A follower's
        # process does all its work on this thread: its GPU becomes the current device.  A leader loads and
        # captures here within its GPU (the caller's thread keeps its own); its steps run on its engine's thread
        if tp_rank:
            torch.cuda.set_device(device)
        on_device = torch.cuda.device(device)
    with on_device:
        model = load_stage(open_checkpoint(spec.model_dir), cfg, spec.part(cfg, tp_rank), DTYPES[spec.dtype], device,
                           show_progress=show_progress, quantize=spec.quantize)
        kv = model.new_kv_cache(spec.max_batch, spec.max_seq_len, spec.kv_tokens or None)
        tp = TensorParallelGroup(pg, device) if pg is not None else None
        return StageExecutor(model, kv, tp, capture_graphs=capture_graphs)


def kv_tokens_that_fit(cfg: LlamaConfig, layers: int, tp: int, dtype: str, device: torch.device,
                       memory_fraction: float) -> int:
    """KV positions that fit on `device` beside this stage's weights: the share `memory_fraction`
    of the device's free memory, less the weights and a reserve for activations and graphs."""
    import math

    from hexswarm.model.kv_cache import kv_bytes_per_token

    dt = DTYPES[dtype]
    size = torch.empty((), dtype=dt).element_size()
    H, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per_layer = H * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd + cfg.num_attention_heads * hd * H + 3 * H * F
    weights = (layers * per_layer // tp + 2 * cfg.vocab_size * H) * size
    free, _total = torch.cuda.mem_get_info(device)
    reserve = 2 << 30  # prefill activations, CUDA graphs, the sampler
    per_token = kv_bytes_per_token(layers, math.ceil(cfg.num_key_value_heads / tp), hd, dt)
    return max(0, int((free * memory_fraction - weights - reserve) // per_token))


class StageHost:
    """Load and run one stage; `run(op)` is blocking and must be called from one thread."""

    def __init__(self, spec: StageSpec, tag: str, show_progress: bool = False):
        self.spec = spec
        self.tag = tag
        self.show_progress = show_progress  # a progress bar while the leader's shard loads
        self.followers: list[subprocess.Popen] = []
        self._step_failed = False  # a step raised part-way (see run)
        self._store = None
        self._group = None  # the TP group's process group (tp > 1)
        self.executor: StageExecutor | None = None

    def start(self) -> None:
        pg = None
        if self.spec.tp > 1:
            port = free_port()
            # followers connect to the store this process hosts
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            for r in range(1, self.spec.tp):
                self.followers.append(subprocess.Popen(
                    [sys.executable, "-m", "hexswarm.runtime.tp_follower", *self.spec.to_args(),
                     "--rank", str(r), "--store-port", str(port), "--tag", self.tag, "--parent", str(os.getpid())],
                    env=env, stdin=subprocess.DEVNULL,
                ))
            pg, self._store = make_group(self.spec.device, port, self.tag, 0, self.spec.tp, True)
            self._group = pg
        self.executor = build_executor(self.spec, 0, pg, capture_graphs=True, show_progress=self.show_progress)

    @property
    def model(self):
        return self.executor.model

    def run(self, op: dict) -> torch.Tensor:
        """Forward one step (see StageExecutor.lead); the result may be a view of a CUDA-graph
        buffer that the next call overwrites.  Raises when a follower has exited: the collective
        would otherwise wait for it (OP_TIMEOUT), and the engine fails the stage over on the error."""
        exited = self.exited_follower()
        if exited is not None:
            raise RuntimeError(f"stage {self.tag}: a tensor-parallel follower exited (TP rank {exited[0]}, "
                               f"code {exited[1]})")
        try:
            return self.executor.lead(op)
        except BaseException:
            # a step that failed part-way may leave a follower inside a collective: a `stop` sent now would
            # wait for it forever (OP_TIMEOUT), so close() ends the followers instead
            self._step_failed = True
            raise

    def followers_alive(self) -> bool:
        return self.exited_follower() is None

    def exited_follower(self) -> tuple[int, int] | None:
        """(TP rank, exit status) of the first follower process that has exited (a negative status: the
        signal that killed it), or None."""
        for tp_rank, p in enumerate(self.followers, start=1):
            if p.poll() is not None:
                return tp_rank, p.returncode
        return None

    def close(self) -> None:
        if self.executor is not None and self.followers and self.followers_alive() and not self._step_failed:
            try:
                self.executor.lead({"op": "stop"})
            except Exception:
                pass
        for p in self.followers:
            if self._step_failed:
                p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        self.followers.clear()
        if self._group is not None and self.spec.device == "cuda":
            # the followers are gone: NCCL's communicators go now (a group left to its destructor prints
            # torch's "destroy_process_group() was not called" warning)
            self._group.abort()
        self._group = None
        self.executor = None

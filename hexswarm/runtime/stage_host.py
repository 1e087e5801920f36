"""One stage of a served pipeline on this host: the leader shard in this process and,
for TP > 1, one follower process per extra rank, joined by a standalone gloo/NCCL
process group (several stages can live in one process, e.g. during a layout change).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from hexswarm.model.config import LlamaConfig
from hexswarm.model.shard import TensorShard
from hexswarm.model.source import open_checkpoint
from hexswarm.model.stage import DTYPES, StagePart, load_stage
from hexswarm.net.ports import free_port
from hexswarm.runtime.executor import StageExecutor, TensorParallelGroup

# Setting a group up (followers start, load and connect) must finish within this.
SETUP_TIMEOUT = datetime.timedelta(minutes=10)
# A collective's timeout is also how long an idle follower waits for its leader's next op, so an
# idle stage must not hit it: effectively unbounded.  A follower that exits is caught by
# followers_alive before every op instead (and a closed gloo socket fails a pending collective).
OP_TIMEOUT = datetime.timedelta(days=365)


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
        return self.executor.lead(op)

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
        if self.executor is not None and self.followers and self.followers_alive():
            try:
                self.executor.lead({"op": "stop"})
            except Exception:
                pass
        for p in self.followers:
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

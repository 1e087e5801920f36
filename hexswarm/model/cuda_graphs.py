"""Decode steps replayed from CUDA graphs, one graph per batch bucket.

A decode step of a 7B model is ~300 kernel launches; launched one by one from
Python they cost more than the GPU work at small batch.  `DecodeGraphRunner`
captures the whole step (embedding, every layer of the stage, final norm and
lm_head) once per batch size, with static buffers for the input (token ids or
hidden states), the slots and the positions, and replays it.  Each step costs
one pinned host-to-device copy (slots and positions), one device copy of the
input and one graph launch; nothing waits on the GPU.

A step of B rows replays the graph of the smallest bucket >= B (1, 2, 4, 8, then
every multiple of 8): the padding rows read and write the KV cache's scratch slot
and their outputs are dropped, so any batch size replays a graph.  The KV cache's block table is
read by the kernels on the device, so a replay sees the blocks the slots hold now.  A server
captures every bucket up to its slot count at load (`capture_all`), so serving
never stalls on a capture; otherwise a bucket is captured on its first step, from
that step's real inputs (warm-up runs write the same K/V the replay writes).
All graphs share one memory pool.

Off CUDA (or with use_graphs=False) the runner runs the same step eagerly, so
callers have one code path everywhere.
"""

from __future__ import annotations

import torch

from hexswarm.model.kv_cache import KVCache
from hexswarm.model.layers import StepMeta


class _Captured:
    __slots__ = ("graph", "inp", "meta", "out")


def batch_buckets(max_batch: int) -> list[int]:
    """The padded batch sizes graphs are captured for, up to max_batch (included)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sizes + [max_batch]


def bucket_for(B: int, buckets: list[int]) -> int:
    return next((b for b in buckets if b >= B), B)


class DecodeGraphRunner:
    def __init__(self, model, kv: KVCache, all_reduce=None, use_graphs: bool | None = None, warmup: int = 2):
        """all_reduce must be graph-capturable (NCCL is; gloo is not) when graphs are on."""
        self.model = model
        self.kv = kv
        self.all_reduce = all_reduce
        cuda = torch.device(model.device).type == "cuda"
        self.use_graphs = cuda if use_graphs is None else (use_graphs and cuda)
        self.warmup = warmup
        self.takes_ids = model.embedding is not None
        self._graphs: dict[int, _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.buckets = batch_buckets(kv.n_slots)

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self._graphs)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket now (padding rows only: they touch the scratch slot alone)."""
        if not self.use_graphs:
            return
        for B in self.buckets:
            if B not in self._graphs:
                meta = torch.tensor([self.kv.scratch_slot] * B + [0] * (B % 2) + [0] * (B + B % 2), dtype=torch.long)
                self._graphs[B] = self._capture(self._padding_input(B), meta)

    def _body(self, inp: torch.Tensor, meta_t: torch.Tensor) -> torch.Tensor:
        m = self.model
        B = inp.shape[0]
        half = meta_t.shape[0] // 2  # slots, then positions, each section padded to 16 bytes
        slot, pos = meta_t[:B], meta_t[half:half + B]
        x = m.embed(inp.view(B)) if self.takes_ids else inp.view(B, -1)
        if m.uses_fast_path(x):
            h = m.forward_fast(x, self.kv, StepMeta.decode(slot, pos), self.all_reduce)
        else:
            rows = [(s, p, 1) for s, p in zip(slot.tolist(), pos.tolist())]
            h = m.forward_rows(x, self.kv, rows, self.all_reduce)
        return m.logits(h) if m.lm_head is not None else h

    @torch.inference_mode()
    def step(self, inp: torch.Tensor, slots: list[int], start: list[int]) -> torch.Tensor:
        """One decode step.  inp: token ids [B] / [B, 1] on the first stage, else hidden
        [B, H] / [B, 1, H]; row b writes slot slots[b] at position start[b].  Returns float32
        logits [B, V] on the last stage, else hidden [B, H].  With graphs on, the returned
        tensor is a view of a static buffer that the next step overwrites: consume or copy it first."""
        B = len(slots)
        self.kv.prepare([(int(s), int(p), 1) for s, p in zip(slots, start)])
        if not self.use_graphs:
            meta_host = torch.tensor([int(s) for s in slots] + [int(p) for p in start], dtype=torch.long)
            inp = inp.to(self.model.device)
            return self._body(inp.reshape(B) if self.takes_ids else inp.reshape(B, -1), meta_host.to(self.model.device))
        Bp = bucket_for(B, self.buckets)
        pad = Bp - B
        meta_host = torch.tensor([int(s) for s in slots] + [self.kv.scratch_slot] * pad + [0] * (Bp % 2)
                                 + [int(p) for p in start] + [0] * pad + [0] * (Bp % 2), dtype=torch.long)
        g = self._graphs.get(Bp)
        if g is None:
            full = torch.cat([inp.reshape(B, -1).to(self.model.device),
                              self._padding_input(pad).reshape(pad, -1)]) if pad else inp
            g = self._capture(full, meta_host)
            self._graphs[Bp] = g
        g.meta.copy_(meta_host.pin_memory(), non_blocking=True)
        g.inp[:B].copy_(inp.reshape((B,) + tuple(g.inp.shape[1:])), non_blocking=True)
        g.graph.replay()
        return g.out[:B]

    def _padding_input(self, B: int) -> torch.Tensor:
        m = self.model
        shape = (B,) if self.takes_ids else (B, m.cfg.hidden_size)
        return torch.zeros(shape, dtype=torch.long if self.takes_ids else m.dtype, device=m.device)

    def _capture(self, inp: torch.Tensor, meta_host: torch.Tensor) -> _Captured:
        m = self.model
        dev = torch.device(m.device)
        g = _Captured()
        B = inp.shape[0]
        g.inp = self._padding_input(B)
        g.inp.copy_(inp.reshape(g.inp.shape))
        g.meta = meta_host.to(dev)
        m.rope_tables(self.kv.max_len)  # allocate outside the graph
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: compiles the kernels, sizes cuBLAS workspaces
            for _ in range(self.warmup):
                self._body(g.inp, g.meta)
        torch.cuda.current_stream(dev).wait_stream(side)
        g.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g.graph, pool=self._pool):
            g.out = self._body(g.inp, g.meta)
        return g

"""Decode steps replayed from CUDA graphs, one graph per batch size.

A decode step of a 7B model is ~300 kernel launches; launched one by one from
Python they cost more than the GPU work at small batch.  `DecodeGraphRunner`
captures the whole step (embedding, every layer of the stage, final norm and
lm_head) once per batch size, with static buffers for the input (token ids or
hidden states), the slots and the positions, and replays it.  Each step costs
one pinned host-to-device copy (slots and positions), one device copy of the
input and one graph launch; nothing waits on the GPU.

The graph is captured lazily, on the first step of a new batch size, from that
step's real inputs: warm-up runs write the same K/V the replay writes, so the
capture is invisible to the caller.  All graphs share one memory pool.

Off CUDA (or with use_graphs=False) the runner runs the same step eagerly, so
callers have one code path everywhere.
"""

from __future__ import annotations

import torch

from hexswarm.model.kv_cache import KVCache
from hexswarm.model.layers import StepMeta


class _Captured:
    __slots__ = ("graph", "inp", "meta", "out")


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

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self._graphs)

    def _body(self, inp: torch.Tensor, meta_t: torch.Tensor) -> torch.Tensor:
        m = self.model
        B = meta_t.shape[0] // 2
        x = m.embed(inp.view(B, 1)) if self.takes_ids else inp.view(B, 1, -1)
        if m.uses_fast_path(x):
            h = m.forward_fast(x, self.kv, StepMeta(meta_t[:B], meta_t[B:], 1, False, None), self.all_reduce)
        else:
            h = m(x, self.kv, meta_t[:B].tolist(), meta_t[B:].tolist(), self.all_reduce)
        return m.logits(h[:, -1]) if m.lm_head is not None else h

    @torch.inference_mode()
    def step(self, inp: torch.Tensor, slots: list[int], start: list[int]) -> torch.Tensor:
        """One decode step.  inp: token ids [B] / [B, 1] on the first stage, else hidden
        [B, 1, H]; row b writes slot slots[b] at position start[b].  Returns float32 logits
        [B, V] on the last stage, else hidden [B, 1, H].  With graphs on, the returned
        tensor is a static buffer that the next step overwrites: consume or copy it first."""
        B = len(slots)
        meta_host = torch.tensor([int(s) for s in slots] + [int(p) for p in start], dtype=torch.long)
        if not self.use_graphs:
            return self._body(inp.to(self.model.device), meta_host.to(self.model.device))
        g = self._graphs.get(B)
        if g is None:
            g = self._capture(inp, meta_host)
            self._graphs[B] = g
        g.meta.copy_(meta_host.pin_memory(), non_blocking=True)
        g.inp.copy_(inp.reshape(g.inp.shape), non_blocking=True)
        g.graph.replay()
        return g.out

    def _capture(self, inp: torch.Tensor, meta_host: torch.Tensor) -> _Captured:
        m = self.model
        dev = torch.device(m.device)
        g = _Captured()
        B = meta_host.shape[0] // 2
        shape = (B,) if self.takes_ids else (B, 1, m.cfg.hidden_size)
        g.inp = torch.empty(shape, dtype=torch.long if self.takes_ids else m.dtype, device=dev)
        g.inp.copy_(inp.reshape(shape))
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

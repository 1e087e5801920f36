"""Engine steps replayed from CUDA graphs: decode steps, one graph per batch bucket, and steps that
mix decode rows with prompt chunks, one graph per (decode bucket, prompt-token bucket).

A decode step of a 7B model is ~300 kernel launches; launched one by one from
Python they cost more than the GPU work at small batch.  `StepGraphRunner`
captures the whole step (embedding, every layer of the stage, final norm and
lm_head) once per shape, with static buffers for the input (token ids or
hidden states), the slots and the positions, and replays it.  Each step costs
one pinned host-to-device copy (its metadata), one device copy of the input
and one graph launch; nothing waits on the GPU.

A decode step of B rows replays the graph of the smallest bucket >= B (1, 2, 4, 8, then
every multiple of 8): the padding rows read and write the KV cache's scratch slot
and their outputs are dropped, so any batch size replays a graph.  The KV cache's block table is
read by the kernels on the device, so a replay sees the blocks the slots hold now.

A mixed step (decode rows first, then up to MIXED_MAX_SEGMENTS prompt chunks of at most
MIXED_TOKEN_BUCKETS[-1] tokens in all) is laid out as [decode rows | padding to the decode bucket |
prompt tokens | padding to the token bucket]; the padding tokens write the scratch slot, the chunk
attention's padding work items are empty, and the step's outputs (each row's last-token logits on
the last stage, the real tokens' hidden states elsewhere) come out through static buffers that all
mixed graphs share.  Without graphs such a step ran eagerly: at 32 streams it cost more than running
its prompt tokens apart (docs/BENCHMARKS.md, run 16), so chunked prefill could not ride on decode.
Larger prompt steps still run eagerly: they are compute-bound, and launches hide behind the GPU.

A server captures every shape at load (`capture_all`), so serving never stalls on a capture;
otherwise a shape is captured on its first step: a decode shape from that step's real inputs (warm-up
runs write the same K/V the replay writes), a mixed shape on padding.  All graphs share one memory pool.

Off CUDA (or with use_graphs=False) the runner runs decode steps eagerly, so
callers have one code path everywhere, and takes no mixed steps.
"""

from __future__ import annotations

import torch

from hexswarm.model.attention import CHUNK_BLOCK_M, chunk_work
from hexswarm.model.kv_cache import KVCache
from hexswarm.model.layers import StepMeta, leading_decode_rows

# decode-row buckets of mixed steps: coarser than decode steps' (a padding decode row costs a
# scratch-slot attention and a GEMM row), so the graphs stay few
MIXED_DECODE_BUCKETS = (0, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# prompt-token buckets: up to where a step stops being bound by reading the weights (H100/H200)
MIXED_TOKEN_BUCKETS = (64, 128, 192, 256, 384, 512)
MIXED_MAX_SEGMENTS = 8


class _Captured:
    __slots__ = ("graph", "inp", "meta", "out")


def batch_buckets(max_batch: int) -> list[int]:
    """The padded batch sizes graphs are captured for, up to max_batch (included)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sizes + [max_batch]


def bucket_for(B: int, buckets: list[int]) -> int:
    return next((b for b in buckets if b >= B), B)


def _even(n: int) -> int:
    return n + n % 2


class _MixedShape:
    """The sizes of one mixed graph: D decode rows, T prompt tokens, W chunk work items, R output rows.
    Every section of its metadata holds an even count, so each starts 16-byte aligned (Triton
    specialises kernels on pointer alignment)."""

    __slots__ = ("D", "T", "N", "W", "R")

    def __init__(self, D: int, T: int):
        self.D, self.T, self.N = D, T, D + T
        self.W = _even(T // CHUNK_BLOCK_M + MIXED_MAX_SEGMENTS)
        self.R = D + MIXED_MAX_SEGMENTS

    def split(self, meta_t: torch.Tensor):
        N, W = self.N, self.W
        return meta_t[:N], meta_t[N:2 * N], meta_t[2 * N:2 * N + 4 * W].view(4, W), meta_t[2 * N + 4 * W:]

    def host_meta(self, rows, scratch: int) -> list[int]:
        """tok_slot, tok_pos, work (4 rows), last-token index of each row: every section padded."""
        n_dec = leading_decode_rows(rows)
        D, N = self.D, self.N
        tok_slot = [r[0] for r in rows[:n_dec]] + [scratch] * (D - n_dec)
        tok_pos = [r[1] for r in rows[:n_dec]] + [0] * (D - n_dec)
        segments, last = [], list(range(n_dec))
        for slot, start, length in rows[n_dec:]:
            segments.append((len(tok_slot), length, slot, start))
            tok_slot += [slot] * length
            tok_pos += range(start, start + length)
            last.append(len(tok_slot) - 1)
        tok_slot += [scratch] * (N - len(tok_slot))
        tok_pos += [0] * (N - len(tok_pos))
        work = chunk_work(segments)
        pad = self.W - len(work[0])
        for col, fill in zip(work, (0, 0, scratch, 0)):  # empty items: no rows, no keys
            col += [fill] * pad
        return tok_slot + tok_pos + [v for col in work for v in col] + last + [0] * (self.R - len(last))


class StepGraphRunner:
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
        self._mixed: dict[tuple[int, int], _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.buckets = batch_buckets(kv.max_batch)
        self.mixed_decode = [b for b in MIXED_DECODE_BUCKETS if b < kv.max_batch] + [kv.max_batch]
        self.mixed_tokens = list(MIXED_TOKEN_BUCKETS)
        self._mixed_out: torch.Tensor | None = None  # shared by every mixed graph (see module doc)

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self._graphs)

    @torch.inference_mode()
    def capture_all(self, mixed: bool = True) -> None:
        """Capture every shape now (padding rows only: they touch the scratch slot alone); the decode
        shapes alone with mixed=False."""
        if not self.use_graphs:
            return
        for B in self.buckets:
            if B not in self._graphs:
                meta = torch.tensor([self.kv.scratch_slot] * B + [0] * (B % 2) + [0] * (B + B % 2), dtype=torch.long)
                self._graphs[B] = self._capture(self._padding_input(B), meta, self._body)
        for D in reversed(self.mixed_decode if mixed else []):  # the largest first: the smaller reuse its pool memory
            for T in reversed(self.mixed_tokens):
                if (D, T) not in self._mixed:
                    self._capture_mixed(_MixedShape(D, T))

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
            g = self._capture(full, meta_host, self._body)
            self._graphs[Bp] = g
        g.meta.copy_(meta_host.pin_memory(), non_blocking=True)
        g.inp[:B].copy_(inp.reshape((B,) + tuple(g.inp.shape[1:])), non_blocking=True)
        g.graph.replay()
        return g.out[:B]

    def run(self, inp: torch.Tensor, rows) -> torch.Tensor | None:
        """A step of (slot, start, length) rows, inp their new tokens back to back, as `step` or
        `mixed_step` runs it; None when no graph holds it (the caller runs it eagerly)."""
        if all(r[2] == 1 for r in rows):
            return self.step(inp, [r[0] for r in rows], [r[1] for r in rows])
        shape = self.mixed_shape(rows)
        return None if shape is None else self.mixed_step(inp, rows, shape)

    # ---- mixed steps -------------------------------------------------------------------
    def mixed_shape(self, rows) -> _MixedShape | None:
        """The graph a step of (slot, start, length) rows replays, or None (graphs off, no prompt
        chunk, or more prompt tokens or chunks than any graph holds: the caller runs it eagerly)."""
        if not self.use_graphs:
            return None
        n_dec = leading_decode_rows(rows)
        chunks = len(rows) - n_dec
        if not chunks or chunks > MIXED_MAX_SEGMENTS:
            return None
        tokens = sum(r[2] for r in rows[n_dec:])
        D = next((b for b in self.mixed_decode if b >= n_dec), None)
        T = next((t for t in self.mixed_tokens if t >= tokens), None)
        return None if D is None or T is None else _MixedShape(D, T)

    @torch.inference_mode()
    def mixed_step(self, inp: torch.Tensor, rows, shape: _MixedShape) -> torch.Tensor:
        """A step of decode rows and prompt chunks (shape from `mixed_shape(rows)`).  inp: the rows'
        new tokens back to back: ids [N] on the first stage, else hidden [N, H].  Returns float32
        logits of every row's last token [R, V] on the last stage (a view of a shared static
        buffer: consume it before the next step), else hidden [N, H]."""
        self.kv.prepare(rows)
        n_dec = leading_decode_rows(rows)
        tokens = inp.shape[0] - n_dec
        meta_host = torch.tensor(shape.host_meta(rows, self.kv.scratch_slot), dtype=torch.long)
        g = self._mixed.get((shape.D, shape.T)) or self._capture_mixed(shape)
        g.meta.copy_(meta_host.pin_memory(), non_blocking=True)
        inp = inp.reshape((inp.shape[0],) + tuple(g.inp.shape[1:]))
        if not self.takes_ids:
            inp = inp.to(self.model.device, self.model.dtype)
        g.inp[:n_dec].copy_(inp[:n_dec], non_blocking=True)
        g.inp[shape.D:shape.D + tokens].copy_(inp[n_dec:], non_blocking=True)
        g.graph.replay()
        if self.model.lm_head is not None:
            return g.out[:len(rows)]
        return torch.cat([g.out[:n_dec], g.out[shape.D:shape.D + tokens]])

    def _capture_mixed(self, shape: _MixedShape) -> _Captured:
        """Captured on padding alone (its warm-up writes only the scratch slot); every replay copies its
        own input and metadata in first."""
        m = self.model
        if self._mixed_out is None:
            rows_max = max(self.mixed_decode) + (MIXED_MAX_SEGMENTS if m.lm_head is not None else max(self.mixed_tokens))
            width = m.cfg.vocab_size if m.lm_head is not None else m.cfg.hidden_size
            self._mixed_out = torch.empty(rows_max, width, dtype=torch.float32 if m.lm_head is not None else m.dtype,
                                          device=m.device)

        def body(inp_t: torch.Tensor, meta_t: torch.Tensor) -> torch.Tensor:
            tok_slot, tok_pos, work, last = shape.split(meta_t)
            x = m.embed(inp_t) if self.takes_ids else inp_t
            h = m.forward_fast(x, self.kv, StepMeta(tok_slot, tok_pos, shape.D, chunk_work=work), self.all_reduce)
            if m.lm_head is not None:
                out = self._mixed_out[:shape.R]
                out.copy_(m.logits(h.index_select(0, last)))
            else:
                out = self._mixed_out[:shape.N]
                out.copy_(h)
            return out

        meta = torch.tensor(shape.host_meta([], self.kv.scratch_slot), dtype=torch.long)
        g = self._capture(self._padding_input(shape.N), meta, body)
        self._mixed[(shape.D, shape.T)] = g
        return g

    def _padding_input(self, B: int) -> torch.Tensor:
        m = self.model
        shape = (B,) if self.takes_ids else (B, m.cfg.hidden_size)
        return torch.zeros(shape, dtype=torch.long if self.takes_ids else m.dtype, device=m.device)

    def _capture(self, inp: torch.Tensor, meta_host: torch.Tensor, body) -> _Captured:
        m = self.model
        dev = torch.device(m.device)
        g = _Captured()
        B = inp.shape[0]
        g.inp = self._padding_input(B)
        g.inp.copy_(inp.reshape(g.inp.shape))
        g.meta = meta_host.to(dev)
        m.rope_tables(self.kv.max_seq_len)  # allocate outside the graph
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: compiles the kernels, sizes cuBLAS workspaces
            for _ in range(self.warmup):
                body(g.inp, g.meta)
        torch.cuda.current_stream(dev).wait_stream(side)
        g.graph = torch.cuda.CUDAGraph()
        # captured on the stage's own stream: torch's default capture stream is made once, on the device of
        # the first capture, and a process with stages on several GPUs (`hexswarm generate`) would capture there
        with torch.cuda.graph(g.graph, pool=self._pool, stream=side):
            g.out = body(g.inp, g.meta)
        return g

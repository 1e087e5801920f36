"""One tensor-parallel shard of a Llama decoder layer (fused QKV and gate/up projections), and the rotary
position embeddings it applies (exactly as HF computes them).

Two paths compute the same function:

* ``DecoderLayerShard.forward``: plain torch ops, bit-for-bit the arithmetic of
  transformers' Llama (the CPU path; tests compare it with transformers).
* ``DecoderLayerShard.forward_fast``: the CUDA path.  Every elementwise stage is
  one Triton kernel (residual add + RMSNorm, rotary + KV-cache store, SiLU*up; in a
  decode-only step the rotary and the KV store run inside the decode attention kernel),
  decode attention reads the cache through slot indices (no gather), and nothing
  in it waits on the host, so a whole decode step can be captured in a CUDA graph
  (see ``hexswarm.model.cuda_graphs``).  It rounds where transformers rounds.  Where a
  quantized projection runs the int8-activation GEMV ("dp4a"), the kernel that makes
  its input also writes that input's int8 rows (quant.int8_rows_for).
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hexswarm.model import pdl
from hexswarm.model.attention import (cached_attention, chunk_attention, chunk_work, decode_attention,
                                      prefill_attention)
from hexswarm.model.config import LlamaConfig
from hexswarm.model.kv_cache import KVCache, rotary_store
from hexswarm.model.quant import QuantLinear, int8_rows_for, linear
from hexswarm.model.quant_format import GROUP
from hexswarm.model.quant_kernels import Int8Rows
from hexswarm.model.shard import TensorShard

AllReduce = Callable[[torch.Tensor], torch.Tensor]

try:  # Triton ships with CUDA builds of torch; absent on CPU-only hosts
    import triton
    import triton.language as tl

    from hexswarm.model.quant_kernels import store_int8_groups

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the host
    HAVE_TRITON = False

# TRITON_INTERPRET=1 runs the kernels on CPU tensors (slowly): for checking them off-GPU.
TRITON_ON_CPU = HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


# ---- rotary position embeddings, computed exactly as HF Llama does (float32 angles) -------------------------

def inverse_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / float(scaling["factor"])
    # llama3: long wavelengths are scaled down, short kept, the band between interpolated.
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [*positions.shape, head_dim] for integer positions."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; cos/sin: [B, T, head_dim]."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def fast_kernels_for(x: torch.Tensor) -> bool:
    """Whether the Triton path can run on this tensor's device."""
    return HAVE_TRITON and (x.is_cuda or TRITON_ON_CPU)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As HF: normalise in float32, scale in the input dtype.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


if HAVE_TRITON:

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, qc_ptr, qs_ptr, qsum_ptr, N, eps,
                            HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, Q8: tl.constexpr, GROUP_SIZE: tl.constexpr,
                            PDL: tl.constexpr):
        # row-wise: x += delta (stored back, rounded as torch rounds); out = w * norm(x), and with Q8
        # its int8 rows too (quant_kernels.store_int8_groups: the input of a "dp4a" GEMV)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        pdl.release(PDL)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # a weight: before the wait (model/pdl.py)
        pdl.wait(PDL)
        x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0)
        if HAS_DELTA:
            d = tl.load(d_ptr + row * N + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(x_ptr + row * N + cols, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / N
        h = (xf * (1.0 / tl.sqrt(var + eps))).to(out_ptr.dtype.element_ty)
        out = (w.to(tl.float32) * h.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * N + cols, out, mask=mask)
        if Q8:
            store_int8_groups(out.to(tl.float32), qc_ptr, qs_ptr, qsum_ptr, row, 0, N, BLOCK, GROUP_SIZE)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, qc_ptr, qs_ptr, qsum_ptr, F_SIZE, BLOCK: tl.constexpr, Q8: tl.constexpr,
                         GROUP_SIZE: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < F_SIZE
        pdl.release(PDL)
        pdl.wait(PDL)
        g = tl.load(gu_ptr + row * 2 * F_SIZE + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * F_SIZE + F_SIZE + offs, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # silu, rounded as torch
        out = (s * u).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * F_SIZE + offs, out, mask=mask)
        if Q8:
            store_int8_groups(out.to(tl.float32), qc_ptr, qs_ptr, qsum_ptr, row, tl.program_id(1) * BLOCK, F_SIZE,
                              BLOCK, GROUP_SIZE)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                q8: Int8Rows | None = None) -> torch.Tensor:
    """In place x += delta (when given); returns weight * rmsnorm(x).  x: contiguous [..., N].
    q8: filled with the result's int8 rows (quant.int8_rows_for)."""
    N = x.shape[-1]
    rows = x.numel() // N
    out = torch.empty_like(x)
    if delta is not None and not delta.is_contiguous():
        delta = delta.contiguous()
    block = triton.next_power_of_2(N)
    _add_rmsnorm_kernel[(rows,)](x, delta if delta is not None else x, weight, out, *(q8 or (x, x, x)), N, eps,
                                 HAS_DELTA=delta is not None, BLOCK=block, Q8=q8 is not None, GROUP_SIZE=GROUP,
                                 num_warps=min(16, max(1, block // 256)), **pdl.launch_kwargs(x.device))
    return out


def silu_mul(gu: torch.Tensor, q8: Int8Rows | None = None) -> torch.Tensor:
    """silu(gate) * up for gu = [..., 2F] (gate first); returns [..., F].  q8: as add_rmsnorm's."""
    F2 = gu.shape[-1]
    rows = gu.numel() // F2
    out = torch.empty(*gu.shape[:-1], F2 // 2, dtype=gu.dtype, device=gu.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(F2 // 2, block))](gu, out, *(q8 or (gu, gu, gu)), F2 // 2, BLOCK=block,
                                                          Q8=q8 is not None, GROUP_SIZE=GROUP, num_warps=4,
                                                          **pdl.launch_kwargs(gu.device))
    return out


def _empty(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def leading_decode_rows(rows: list[tuple[int, int, int]]) -> int:
    """How many of a step's (slot, start, length) rows, from the first, are one-token decode rows."""
    n = 0
    while n < len(rows) and rows[n][2] == 1:
        n += 1
    return n


class Segment:
    """A row of more than one new token (a prompt or a chunk of one) inside a step:
    tokens [offset, offset + length) of the flattened batch, written to `slot` at
    positions [start, start + length).  start_t/total_t: [1] long on the device."""

    __slots__ = ("offset", "length", "slot", "start", "start_t", "total_t")

    def __init__(self, offset: int, length: int, slot: int, start: int, start_t, total_t):
        self.offset, self.length, self.slot, self.start = offset, length, slot, start
        self.start_t, self.total_t = start_t, total_t


class StepMeta:
    """Per-step tensors of a ragged batch, built once per step (not per layer).

    A step is rows of new tokens, flattened to N tokens: first `n_decode` decode rows
    (one token each, slot dec_slot[b] at position dec_pos[b]), then `segments` (prompt
    chunks).  tok_slot, tok_pos: [N] long on the device, one per token (rotary + KV store).
    A step without segments needs no host value, so it can be captured in a CUDA graph.
    """

    __slots__ = ("tok_slot", "tok_pos", "n_decode", "dec_slot", "dec_pos", "segments", "chunk_work")

    def __init__(self, tok_slot, tok_pos, n_decode: int, segments: tuple[Segment, ...] = (), chunk_work=None):
        self.tok_slot, self.tok_pos, self.n_decode, self.segments = tok_slot, tok_pos, n_decode, segments
        self.dec_slot, self.dec_pos = tok_slot[:n_decode], tok_pos[:n_decode]
        self.chunk_work = chunk_work  # [4, W] on the device: every segment's work for chunk_attention

    @classmethod
    def decode(cls, slot: torch.Tensor, pos: torch.Tensor) -> "StepMeta":
        """A decode-only step from [B] device tensors (graph-capturable)."""
        return cls(slot, pos, slot.shape[0])

    @classmethod
    def for_rows(cls, rows: list[tuple[int, int, int]], device) -> "StepMeta":
        """rows: (slot, start, length).  The leading one-token rows are decode rows; every row after
        the first longer one is a segment (a one-token segment is correct, only slower).
        One host-to-device copy."""
        n_decode = leading_decode_rows(rows)
        tok_slot: list[int] = []
        tok_pos: list[int] = []
        for slot, start, length in rows:
            tok_slot += [slot] * length
            tok_pos += range(start, start + length)
        seg_rows = rows[n_decode:]
        bounds = [v for _, start, length in seg_rows for v in (start, start + length)]
        offsets = [n_decode + sum(r[2] for r in seg_rows[:i]) for i in range(len(seg_rows))]
        work = chunk_work([(off, length, slot, start) for off, (slot, start, length) in zip(offsets, seg_rows)])
        W = len(work[0])
        # every section starts 16-byte aligned: Triton specialises kernels on pointer alignment, and
        # a section that is aligned in one step and not in the next would compile a kernel mid-serving
        sections = [tok_slot, tok_pos, bounds] + work
        starts, flat = [], []
        for sec in sections:
            starts.append(len(flat))
            flat += sec + [0] * (len(sec) % 2)
        host = torch.tensor(flat, dtype=torch.long)
        dev = torch.device(device)
        if dev.type == "cuda":
            host = host.pin_memory()
        t = host.to(dev, non_blocking=True)
        N = len(tok_slot)
        segments = []
        b0 = starts[2]
        for i, ((slot, start, length), offset) in enumerate(zip(seg_rows, offsets)):
            b = b0 + 2 * i
            segments.append(Segment(offset, length, slot, start, t[b:b + 1], t[b + 1:b + 2]))
        work_t = torch.stack([t[starts[3 + k]:starts[3 + k] + W] for k in range(4)]) if W else None
        return cls(t[starts[0]:starts[0] + N], t[starts[1]:starts[1] + N], n_decode, tuple(segments), work_t)


class DecoderLayerShard(nn.Module):
    # the four projection weights: each a dense Parameter or a QuantLinear (see set_projection)
    PROJECTIONS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")

    def __init__(self, cfg: LlamaConfig, shard: TensorShard, dtype, device, weights_device=None):
        """weights_device "meta": projection weights are shape-only placeholders that the
        loader replaces (quantized loads never allocate the dense weights)."""
        super().__init__()
        hd = cfg.head_dim
        self.n_q = shard.n_q_heads
        self.n_kv = shard.n_kv_heads
        self.head_dim = hd
        self.q_size = self.n_q * hd
        self.kv_size = self.n_kv * hd
        self.ffn = shard.ffn[1] - shard.ffn[0]
        H = cfg.hidden_size
        self.input_norm = RMSNorm(H, cfg.rms_norm_eps, dtype, device)
        self.post_norm = RMSNorm(H, cfg.rms_norm_eps, dtype, device)
        wdev = device if weights_device is None else weights_device
        self.qkv_weight = _empty((self.q_size + 2 * self.kv_size, H), dtype, wdev)
        self.qkv_bias = _empty((self.q_size + 2 * self.kv_size,), dtype, device) if cfg.attention_bias else None
        self.o_weight = _empty((H, self.q_size), dtype, wdev)
        # Row-parallel biases are added once, after the all-reduce.
        self.o_bias = _empty((H,), dtype, device) if cfg.attention_bias else None
        self.gate_up_weight = _empty((2 * self.ffn, H), dtype, wdev)
        self.gate_up_bias = _empty((2 * self.ffn,), dtype, device) if cfg.mlp_bias else None
        self.down_weight = _empty((H, self.ffn), dtype, wdev)
        self.down_bias = _empty((H,), dtype, device) if cfg.mlp_bias else None

    def set_projection(self, name: str, value: "torch.Tensor | QuantLinear") -> None:
        """Replace a projection weight by a loaded dense tensor or a QuantLinear."""
        if name not in self.PROJECTIONS:
            raise ValueError(f"not a projection weight: {name}")
        delattr(self, name)
        if isinstance(value, QuantLinear):
            setattr(self, name, value)
        else:
            setattr(self, name, nn.Parameter(value, requires_grad=False))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: KVCache,
        layer: int,
        slots: torch.Tensor,
        where: torch.Tensor,
        start: torch.Tensor,
        total: torch.Tensor,
        fresh: bool,
        all_reduce: AllReduce | None,
        start_host: list[int] | None = None,
    ) -> torch.Tensor:
        """x: [B, T, H] at positions start[b] + [0, T) of slots [B]; writes K/V into the cache at
        `where` [B, T] (kv.positions of those slots and positions).

        The reference path (plain torch).  `start_host`, when given, spares the
        host from reading `start`/`total` back from the device.
        """
        B, T, _ = x.shape
        h = self.input_norm(x)
        qkv = linear(h, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(B, T, self.n_q, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        q = apply_rotary(q.transpose(1, 2), cos, sin).transpose(1, 2)
        k = apply_rotary(k.transpose(1, 2), cos, sin).transpose(1, 2)
        kv.write(layer, where, k, v)
        if fresh:
            attn = prefill_attention(q, k, v)
        else:
            starts = start_host if start_host is not None else start.tolist()
            k_all, v_all = kv.gather(layer, slots, max(starts) + T)
            attn = cached_attention(q, k_all, v_all, start, total)
        out = linear(attn.reshape(B, T, self.q_size), self.o_weight)
        if all_reduce is not None:
            out = all_reduce(out)
        if self.o_bias is not None:
            out = out + self.o_bias
        x = x + out
        h = self.post_norm(x)
        gate, up = linear(h, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        out = linear(F.silu(gate) * up, self.down_weight)
        if all_reduce is not None:
            out = all_reduce(out)
        if self.down_bias is not None:
            out = out + self.down_bias
        return x + out

    def forward_fast(
        self,
        resid: torch.Tensor,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: KVCache,
        layer: int,
        meta: StepMeta,
        all_reduce: AllReduce | None,
        next_norm: RMSNorm | None,
        h_q8: Int8Rows | None = None,
        next_q8: Int8Rows | None = None,
    ) -> torch.Tensor:
        """The CUDA path.  resid: [N, H] residual stream (updated in place); h: this
        layer's input_norm(resid).  Returns next_norm(resid) after this layer, or None
        when next_norm is None (the caller then has the final residual in resid).
        h_q8: h's int8 rows, when the QKV projection takes them (quant.int8_rows_for); next_q8:
        buffers for the returned tensor's, filled by the kernel that makes it.  The other
        projections' int8 rows are made here the same way, by their inputs' producers."""
        N = resid.shape[0]
        qkv = linear(h, self.qkv_weight, self.qkv_bias, h_q8)  # [N, q + 2kv]
        k_cache, v_cache = kv.k[layer], kv.v[layer]
        attn_q8 = None
        if not meta.segments and meta.chunk_work is None:
            # decode only: the attention kernel rotates q and k and stores k and v itself
            attn_q8 = int8_rows_for(self.o_weight, N, qkv.dtype)
            attn = decode_attention(qkv, k_cache, v_cache, kv.table, meta.dec_slot, meta.dec_pos, self.n_q, self.n_kv,
                                    q8=attn_q8, rope=rope)
        else:
            # rotates q and k in place in qkv, writes k and v to the cache at (slot, pos)
            rotary_store(qkv, rope[0], rope[1], meta.tok_slot, meta.tok_pos, k_cache, v_cache, kv.table, self.n_q,
                         self.n_kv)
            attn = torch.empty(N, self.q_size, dtype=qkv.dtype, device=qkv.device)
            if meta.n_decode:
                decode_attention(qkv[: meta.n_decode], k_cache, v_cache, kv.table, meta.dec_slot, meta.dec_pos,
                                 self.n_q, self.n_kv, out=attn[: meta.n_decode])
            if HAVE_TRITON and qkv.is_cuda and meta.chunk_work is not None:
                # every prompt chunk of the step in one kernel (one SDPA call per chunk per layer
                # cost more host time than the GPU spends on the whole step)
                chunk_attention(qkv, k_cache, v_cache, kv.table, meta.chunk_work, self.n_q, self.n_kv, attn)
            else:
                for seg in meta.segments:
                    attn[seg.offset : seg.offset + seg.length] = self._segment_attention(qkv, kv, layer, seg)
        out = linear(attn, self.o_weight, xq=attn_q8)
        if all_reduce is not None:
            out = all_reduce(out)
        if self.o_bias is not None:
            out = out + self.o_bias
        h_q8 = int8_rows_for(self.gate_up_weight, N, resid.dtype)
        h = add_rmsnorm(resid, out, self.post_norm.weight, self.post_norm.eps, h_q8)
        gu = linear(h, self.gate_up_weight, self.gate_up_bias, h_q8)
        mid_q8 = int8_rows_for(self.down_weight, N, gu.dtype)
        out = linear(silu_mul(gu, mid_q8), self.down_weight, xq=mid_q8)
        if all_reduce is not None:
            out = all_reduce(out)
        if self.down_bias is not None:
            out = out + self.down_bias
        if next_norm is None:
            resid.add_(out)
            return None
        return add_rmsnorm(resid, out, next_norm.weight, next_norm.eps, next_q8)

    def _segment_attention(self, qkv: torch.Tensor, kv: KVCache, layer: int, seg: Segment) -> torch.Tensor:
        """Causal attention of one prompt chunk: over its own keys when it starts the sequence,
        else over the cache (which already holds this chunk's keys).  Returns [length, q_size]."""
        hd, L = self.head_dim, seg.length
        rows = qkv[seg.offset : seg.offset + L]
        q = rows[:, : self.q_size].view(1, L, self.n_q, hd)
        if seg.start == 0:
            k = rows[:, self.q_size : self.q_size + self.kv_size].view(1, L, self.n_kv, hd)
            v = rows[:, self.q_size + self.kv_size :].view(1, L, self.n_kv, hd)
            attn = prefill_attention(q, k, v)
        else:
            slot = torch.full((1,), seg.slot, dtype=torch.long, device=qkv.device)
            k_all, v_all = kv.gather(layer, slot, seg.start + L)
            attn = cached_attention(q, k_all, v_all, seg.start_t, seg.total_t)
        return attn.reshape(L, self.q_size)

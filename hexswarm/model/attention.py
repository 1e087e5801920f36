"""Attention kernels: flash-attn when it imports and the tensors are on CUDA, else torch SDPA,
and a Triton decode kernel that reads the KV cache through slot indices.

Tensors use the flash layout [batch, seq, heads, head_dim]; GQA is handled by
the kernels (no repeat of K/V heads in memory).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hexswarm.model import pdl
from hexswarm.model.quant_format import GROUP

try:  # optional: only on CUDA hosts that installed it
    from flash_attn import flash_attn_func, flash_attn_with_kvcache  # type: ignore

    HAVE_FLASH_ATTN = True
except Exception:  # pragma: no cover - depends on the host
    HAVE_FLASH_ATTN = False

try:
    import triton
    import triton.language as tl

    from hexswarm.model.kv_cache import rotary_mix
    from hexswarm.model.quant_kernels import quantize_rows, store_int8_groups

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the host
    HAVE_TRITON = False


def backend_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "sdpa"
    prefill = "flash_attn" if HAVE_FLASH_ATTN else "sdpa"
    decode = "triton-decode" if HAVE_TRITON else prefill
    return f"prefill={prefill}, decode={decode}"


def _sdpa(q, k, v, mask=None, causal=False):
    return _sdpa_call(q, k, v, mask, causal)


def _sdpa_call(q, k, v, mask, causal):
    # [B, S, H, D] -> [B, H, S, D] views; SDPA handles GQA with enable_gqa.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=causal,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention over a fresh sequence. q/k/v: [B, T, heads, D]."""
    if HAVE_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v, causal=True)
    if q.is_cuda:
        # dense [B, T, H, D] (viewed as [B, H, T, D]), the layout transformers hands SDPA
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _sdpa(q, k, v, causal=True)


def cached_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: torch.Tensor, total: torch.Tensor
) -> torch.Tensor:
    """Attention of new queries at positions [start, start+T) over cached keys [0, total).

    q: [B, T, Hq, D]; k_cache/v_cache: [B, L, Hkv, D] already holding the new keys;
    start, total: [B] long.  Query i of row b sees keys j <= start[b] + i.
    """
    if HAVE_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=total.to(torch.int32), causal=True)
    L = k_cache.shape[1]
    T = q.shape[1]
    key_pos = torch.arange(L, device=q.device)
    query_pos = start[:, None] + torch.arange(T, device=q.device)[None, :]  # [B, T]
    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, T, L]
    return _sdpa(q, k_cache, v_cache, mask=mask[:, None])


if HAVE_TRITON:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, kc_ptr, vc_ptr, table_ptr, slot_ptr, pos_ptr, out_ptr, ws_ptr, cos_ptr, sin_ptr,
        stride_qrow, stride_blk, stride_cl, stride_tab, sm_scale,
        NQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr,
    ):
        # one program per (row, query head, key split); online softmax over the split's share of
        # keys [0, pos] of the row's slot, found through its block table.  SPLITS == 1 writes the output; else it writes
        # (max, sum, unnormalised acc) to the workspace for _decode_reduce_kernel.
        # Before the PDL wait (model/pdl.py) it reads what no kernel of this step writes: the step's
        # slot / pos / block table (copied in before the step), the rotary tables, and the keys and
        # values of the earlier positions [0, pos) (written by earlier steps); so after the wait
        # only q (and this step's key and value) are a memory round trip away, not the chain
        # pos -> block table -> cache.
        pdl.release(PDL)
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        kvh = h // GROUP
        d = tl.arange(0, D)
        slot = tl.load(slot_ptr + b)
        new = tl.load(pos_ptr + b)  # this step's position: keys [0, new] after it
        chunk = tl.cdiv(tl.cdiv(new + 1, SPLITS), BLOCK_N) * BLOCK_N
        lo = sp * chunk
        hi = tl.minimum(lo + chunk, new + 1)
        old_hi = tl.minimum(hi, new)  # the split's earlier keys [lo, old_hi)
        tab = table_ptr + slot * stride_tab
        k, v = _load_keys(kc_ptr, vc_ptr, tab, lo, old_hi, kvh, d, stride_blk, stride_cl, D, BLOCK_N, BLOCK_SIZE)
        HALF: tl.constexpr = D // 2
        if ROPE:
            cos_d = tl.load(cos_ptr + new * HALF + d % HALF)
            sin_d = tl.load(sin_ptr + new * HALF + d % HALF)
        pdl.wait(PDL)  # before any read of the step's q / new key and any write
        row = q_ptr + b * stride_qrow
        if ROPE:  # qkv as the projection left it: rotate q here (k below)
            q = _rotate_head(row + h * D, d, HALF, D, cos_d, sin_d).to(tl.float32) * sm_scale
        else:
            q = tl.load(row + h * D + d).to(tl.float32) * sm_scale
        kn = tl.zeros([D], dtype=kc_ptr.dtype.element_ty)
        vn = tl.zeros([D], dtype=vc_ptr.dtype.element_ty)
        if lo < hi and hi == new + 1:  # this split holds the new key
            new_blk = tl.load(tab + new // BLOCK_SIZE).to(tl.int64)
            dest = new_blk * stride_blk + (new % BLOCK_SIZE) * stride_cl + kvh * D + d
            if ROPE:  # this step's key and value into the cache (every query head of the KV head writes the same bytes)
                kn = _rotate_head(row + (NQ + kvh) * D, d, HALF, D, cos_d, sin_d).to(kc_ptr.dtype.element_ty)
                vn = tl.load(row + (NQ + NQ // GROUP + kvh) * D + d).to(vc_ptr.dtype.element_ty)
                tl.store(kc_ptr + dest, kn)
                tl.store(vc_ptr + dest, vn)
            else:  # stored by rotary_store, a kernel before this one
                kn = tl.load(kc_ptr + dest)
                vn = tl.load(vc_ptr + dest)
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([D], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            # the tile loaded before the wait, with the new key (if it falls here) in its row: the same
            # sums in the same order as a tile read whole from the cache
            n = start + tl.arange(0, BLOCK_N)
            is_new = (n == new)[:, None]
            kt = tl.where(is_new, kn[None, :], k).to(tl.float32)
            vt = tl.where(is_new, vn[None, :], v).to(tl.float32)
            s = tl.sum(kt * q[None, :], axis=1)
            s = tl.where(n < hi, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
            k, v = _load_keys(kc_ptr, vc_ptr, tab, start + BLOCK_N, old_hi, kvh, d, stride_blk, stride_cl, D, BLOCK_N,
                              BLOCK_SIZE)
        if SPLITS == 1:
            tl.store(out_ptr + b * (NQ * D) + h * D + d, (acc / l_i).to(out_ptr.dtype.element_ty))
        else:
            w = ws_ptr + ((b * NQ + h) * SPLITS + sp) * (D + 2)
            tl.store(w + d, acc)
            tl.store(w + D, m_i)
            tl.store(w + D + 1, l_i)

    @triton.jit
    def _load_keys(kc_ptr, vc_ptr, tab, start, end, kvh, d, stride_blk, stride_cl, D: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """Keys and values [BLOCK_N, D] of positions start.. below `end` (zeros past it) through the
        slot's block table `tab`; both loads issued before any use, one round trip."""
        n = start + tl.arange(0, BLOCK_N)
        valid = n < end
        blk = tl.load(tab + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        offs = (blk * stride_blk + (n % BLOCK_SIZE) * stride_cl + kvh * D)[:, None] + d[None, :]
        k = tl.load(kc_ptr + offs, mask=valid[:, None], other=0.0)
        v = tl.load(vc_ptr + offs, mask=valid[:, None], other=0.0)
        return k, v

    @triton.jit
    def _rotate_head(x_ptr, d, HALF: tl.constexpr, D: tl.constexpr, c, s):
        """One head [D] of x*cos + rotate_half(x)*sin, rounded as kv_cache.rotary_store rounds
        (kv_cache.rotary_mix); c, s: [D] (cos / sin of frequency d % HALF)."""
        x = tl.load(x_ptr + d)
        xp = tl.load(x_ptr + (d + HALF) % D).to(tl.float32)
        return rotary_mix(x.to(tl.float32), tl.where(d < HALF, -xp, xp), c, s, x.dtype)

    @triton.jit
    def _decode_reduce_kernel(ws_ptr, out_ptr, qc_ptr, qs_ptr, qsum_ptr, NQ: tl.constexpr, D: tl.constexpr,
                              SPLITS: tl.constexpr, Q8: tl.constexpr, GROUP_SIZE: tl.constexpr, PDL: tl.constexpr):
        pdl.release(PDL)
        pdl.wait(PDL)
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        sp = tl.arange(0, SPLITS)
        d = tl.arange(0, D)
        w = ws_ptr + ((b * NQ + h) * SPLITS + sp) * (D + 2)
        m = tl.load(w + D)  # -inf for an empty split
        l = tl.load(w + D + 1)
        mx = tl.max(m, axis=0)
        scale = tl.exp(m - mx)
        acc = tl.load(w[:, None] + d[None, :])
        num = tl.sum(acc * scale[:, None], axis=0)
        den = tl.sum(l * scale, axis=0)
        out = (num / den).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + b * (NQ * D) + h * D + d, out)
        if Q8:  # the output's int8 rows, for a "dp4a" o-projection (quant_kernels.store_int8_groups)
            store_int8_groups(out.to(tl.float32), qc_ptr, qs_ptr, qsum_ptr, b, h * D, NQ * D, D, GROUP_SIZE)


def _splits(B: int, n_q: int, max_seq_len: int) -> int:
    """Key splits per (row, head).  A decode step's attention is latency-bound at small batch
    (batch 1: 32 programs, each a chain of dependent memory round trips), so split the keys
    until there are ~4 programs per SM (H100: 132) or a split would hold < 16 cache positions;
    none when the batch alone fills the GPU.  B is first rounded up as CUDA-graph buckets are
    (1, 2, 4, then multiples of 8), so an eager step compiles no kernel variant that the
    captured graphs did not already compile."""
    B = 1 << (B - 1).bit_length() if B <= 4 else -(-B // 8) * 8
    programs = B * n_q
    splits = 1
    while programs * splits < 528 and splits < 32 and splits * 16 < max_seq_len:
        splits *= 2
    return splits


def decode_attention(qkv, k_cache, v_cache, table, slot, pos, n_q: int, n_kv: int,
                     out: torch.Tensor | None = None, q8=None, rope=None) -> torch.Tensor:
    """One new query per row.  qkv: [B, (n_q + 2 n_kv) * D] (q first, already rotated);
    k_cache/v_cache: [blocks, BLOCK, n_kv, D] holding keys [0, pos[b]] for slot[b] in the blocks
    `table` [slots, max_blocks] maps;
    slot, pos: [B] long on the device.  Returns [B, n_q * D].  No host reads: the key
    count comes from `pos` inside the kernel, so the launch is the same every step
    (CUDA-graph safe) and each row reads only its own keys.  At small batch the keys are
    split across programs (flash-decoding) and a second kernel combines the parts.
    `out`, when given, is a contiguous [B, n_q * D] buffer to write into; `q8`, when given, the
    quant_kernels.Int8Rows to fill with the output's int8 rows (quant.int8_rows_for).
    rope: (cos_half, sin_half) as kv_cache.rotary_store takes them, for a decode-only step whose qkv
    is not rotated yet: q and k are rotated here and this step's k and v stored into the cache (at
    position pos of each row's slot) as rotary_store would, one kernel less a layer."""
    B = qkv.shape[0]
    D = k_cache.shape[-1]
    assert qkv.stride(1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert slot.is_contiguous() and pos.is_contiguous() and table.is_contiguous()
    if out is None:
        out = torch.empty(B, n_q * D, dtype=qkv.dtype, device=qkv.device)
    assert out.is_contiguous()
    splits = _splits(B, n_q, table.shape[1] * k_cache.shape[1])
    ws = torch.empty(B * n_q * splits * (D + 2) if splits > 1 else 1, dtype=torch.float32, device=qkv.device)
    launch = pdl.launch_kwargs(qkv.device)  # both kernels (model/pdl.py)
    cos, sin = rope if rope is not None else (ws, ws)
    _decode_attention_kernel[(B, n_q, splits)](
        qkv, k_cache, v_cache, table, slot, pos, out, ws, cos, sin,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), table.stride(0), 1.0 / math.sqrt(D),
        NQ=n_q, GROUP=n_q // n_kv, D=D, BLOCK_N=16 if splits >= 8 else (32 if splits > 1 else 64), SPLITS=splits,
        BLOCK_SIZE=k_cache.shape[1], ROPE=rope is not None, num_warps=4, num_stages=2, **launch,
    )
    if splits > 1:
        _decode_reduce_kernel[(B, n_q)](ws, out, *(q8 or (out, out, out)), NQ=n_q, D=D, SPLITS=splits,
                                        Q8=q8 is not None and D % GROUP == 0, GROUP_SIZE=GROUP, num_warps=4, **launch)
    if q8 is not None and (splits == 1 or D % GROUP):  # the output came from the attention kernel itself
        quantize_rows(out, q8)
    return out


if HAVE_TRITON:

    @triton.jit
    def _chunk_attention_kernel(
        q_ptr, kc_ptr, vc_ptr, table_ptr, work_ptr, out_ptr,
        stride_qrow, stride_blk, stride_cl, stride_tab, sm_scale, n_work,
        NQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        # one program per (work item, query head); a work item is BLOCK_M query rows of one prompt
        # chunk: (first token row, rows, slot, first position).  Causal attention over the slot's
        # cache [0, position of each row], which already holds this chunk's keys.
        w = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // GROUP
        row0 = tl.load(work_ptr + w).to(tl.int64)
        n_rows = tl.load(work_ptr + n_work + w)
        slot = tl.load(work_ptr + 2 * n_work + w).to(tl.int64)
        pos0 = tl.load(work_ptr + 3 * n_work + w)
        m = tl.arange(0, BLOCK_M)
        d = tl.arange(0, D)
        valid_m = m < n_rows
        q = tl.load(q_ptr + (row0 + m)[:, None] * stride_qrow + h * D + d[None, :], mask=valid_m[:, None], other=0.0)
        q_pos = pos0 + m
        m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        tab = table_ptr + slot * stride_tab
        end = pos0 + n_rows
        for start in range(0, end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            blk = tl.load(tab + n // BLOCK_SIZE, mask=n < end, other=0).to(tl.int64)
            offs = (blk * stride_blk + (n % BLOCK_SIZE) * stride_cl + kvh * D)[:, None] + d[None, :]
            k = tl.load(kc_ptr + offs, mask=(n < end)[:, None], other=0.0)
            v = tl.load(vc_ptr + offs, mask=(n < end)[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * sm_scale
            s = tl.where(n[None, :] <= q_pos[:, None], s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + (row0 + m)[:, None] * (NQ * D) + h * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=valid_m[:, None])


CHUNK_BLOCK_M = 64


def chunk_work(segments: list[tuple[int, int, int, int]]) -> list[list[int]]:
    """Work items of `chunk_attention` for prompt chunks (first token row, length, slot, first
    position): rows [first rows], [rows], [slots], [first positions], BLOCK_M query rows each."""
    items = [(off + m, min(CHUNK_BLOCK_M, length - m), slot, start + m)
             for off, length, slot, start in segments for m in range(0, length, CHUNK_BLOCK_M)]
    return [list(col) for col in zip(*items)] if items else [[], [], [], []]


def chunk_attention(qkv, k_cache, v_cache, table, work: torch.Tensor, n_q: int, n_kv: int, out: torch.Tensor) -> None:
    """Causal attention of every prompt chunk of a step in one launch.  qkv: [N, (n_q + 2 n_kv) * D]
    (q rotated); the chunks' keys are already in k_cache/v_cache [blocks, BLOCK, n_kv, D] (mapped by `table`);
    work: [4, W] int64 on the device (see chunk_work); writes the chunks' rows of out [N, n_q * D]."""
    D = k_cache.shape[-1]
    W = work.shape[1]
    assert qkv.stride(1) == 1 and k_cache.is_contiguous() and work.is_contiguous() and out.is_contiguous()
    _chunk_attention_kernel[(W, n_q)](
        qkv, k_cache, v_cache, table, work, out, qkv.stride(0), k_cache.stride(0), k_cache.stride(1), table.stride(0),
        1.0 / math.sqrt(D), W,
        NQ=n_q, GROUP=n_q // n_kv, D=D, BLOCK_M=CHUNK_BLOCK_M, BLOCK_N=32 if qkv.dtype == torch.float32 else 64,
        IEEE=qkv.dtype == torch.float32, BLOCK_SIZE=k_cache.shape[1], num_warps=4, num_stages=2,
    )

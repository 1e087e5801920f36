"""A preallocated KV cache with one slot per in-flight request.

Layout [layers, slots, max_len, kv_heads, head_dim] is what flash-attn's
kvcache kernel reads directly; SDPA reads a transposed view.  Slot lengths are
kept by the caller (the stage runtime), which knows every request's position.

`rotary_store` (CUDA path) applies the rotary embedding to q and k in place in
the fused qkv projection's output and writes k and v into the cache, one kernel
for the whole step, slots and positions read from device tensors.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the host
    HAVE_TRITON = False


def kv_bytes_per_slot(n_layers: int, max_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one request at full length."""
    return 2 * n_layers * max_len * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        # one slot more than requests: the padding rows of a CUDA-graph batch write there
        shape = (n_layers, n_slots + 1, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_slots = n_slots
        self.scratch_slot = n_slots
        self.max_len = max_len

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def slot_index(slots: list[int], device) -> torch.Tensor | slice:
    """A slice when the slots are consecutive (a view, no copy), else an index tensor."""
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return torch.tensor(slots, dtype=torch.long, device=device)


if HAVE_TRITON:

    @triton.jit
    def _rotate(x_ptr, offs_h, d, HALF: tl.constexpr, c, s, mask):
        # x*cos + rotate_half(x)*sin, each product and the sum rounded to x's dtype (as torch)
        x1 = tl.load(x_ptr + offs_h[:, None] + d[None, :], mask=mask, other=0.0)
        x2 = tl.load(x_ptr + offs_h[:, None] + HALF + d[None, :], mask=mask, other=0.0)
        dt = x1.dtype
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        o1 = ((f1 * c).to(dt).to(tl.float32) + (-f2 * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((f2 * c).to(dt).to(tl.float32) + (f1 * s).to(dt).to(tl.float32)).to(dt)
        return o1, o2

    @triton.jit
    def _rotary_store_kernel(
        qkv_ptr, cos_ptr, sin_ptr, slot_ptr, pos_ptr, kc_ptr, vc_ptr,
        stride_row, stride_cs, stride_cl,
        NQ: tl.constexpr, NKV: tl.constexpr, HALF: tl.constexpr,
        BQ: tl.constexpr, BKV: tl.constexpr,
    ):
        tok = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)  # 0: q heads, 1: k heads, 2: v heads
        D: tl.constexpr = 2 * HALF
        d = tl.arange(0, HALF)
        pos = tl.load(pos_ptr + tok)
        row = qkv_ptr + tok * stride_row
        c = tl.load(cos_ptr + pos * HALF + d)[None, :]
        s = tl.load(sin_ptr + pos * HALF + d)[None, :]
        # (Triton wants a name bound in both arms of a branch to have one type: distinct names per arm)
        if part == 0:
            hq = tl.arange(0, BQ)
            mq = (hq < NQ)[:, None]
            q1, q2 = _rotate(row, hq * D, d, HALF, c, s, mq)
            tl.store(row + hq[:, None] * D + d[None, :], q1, mask=mq)
            tl.store(row + hq[:, None] * D + HALF + d[None, :], q2, mask=mq)
        else:
            slot = tl.load(slot_ptr + tok)
            hk = tl.arange(0, BKV)
            mk = (hk < NKV)[:, None]
            base = row + NQ * D
            dest = slot * stride_cs + pos * stride_cl + hk[:, None] * D
            if part == 1:
                k1, k2 = _rotate(base, hk * D, d, HALF, c, s, mk)
                tl.store(base + hk[:, None] * D + d[None, :], k1, mask=mk)
                tl.store(base + hk[:, None] * D + HALF + d[None, :], k2, mask=mk)
                tl.store(kc_ptr + dest + d[None, :], k1, mask=mk)
                tl.store(kc_ptr + dest + HALF + d[None, :], k2, mask=mk)
            else:
                vb = base + NKV * D
                v1 = tl.load(vb + hk[:, None] * D + d[None, :], mask=mk, other=0.0)
                v2 = tl.load(vb + hk[:, None] * D + HALF + d[None, :], mask=mk, other=0.0)
                tl.store(vc_ptr + dest + d[None, :], v1, mask=mk)
                tl.store(vc_ptr + dest + HALF + d[None, :], v2, mask=mk)


def rotary_store(qkv, cos_half, sin_half, tok_slot, tok_pos, k_cache, v_cache, n_q: int, n_kv: int) -> None:
    """qkv: [N, (n_q + 2 n_kv) * D] contiguous; cos_half/sin_half: [max_pos, D/2] float32
    (already rounded to the model dtype, as transformers rounds them); tok_slot/tok_pos: [N]
    long; k_cache/v_cache: [slots, max_len, n_kv, D] (one layer)."""
    N = qkv.shape[0]
    half = cos_half.shape[1]
    assert qkv.stride(1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert tok_slot.is_contiguous() and tok_pos.is_contiguous() and cos_half.is_contiguous()
    _rotary_store_kernel[(N, 3)](
        qkv, cos_half, sin_half, tok_slot, tok_pos, k_cache, v_cache,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
        NQ=n_q, NKV=n_kv, HALF=half, BQ=triton.next_power_of_2(n_q), BKV=triton.next_power_of_2(n_kv),
        num_warps=4,
    )

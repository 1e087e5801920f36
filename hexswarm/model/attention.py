"""Attention kernels: flash-attn when it imports and the tensors are on CUDA, else torch SDPA.

Tensors use the flash layout [batch, seq, heads, head_dim]; GQA is handled by
the kernels (no repeat of K/V heads in memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional: only on CUDA hosts that installed it
    from flash_attn import flash_attn_func, flash_attn_with_kvcache  # type: ignore

    HAVE_FLASH_ATTN = True
except Exception:  # pragma: no cover - depends on the host
    HAVE_FLASH_ATTN = False


def backend_name(device: torch.device) -> str:
    return "flash_attn" if HAVE_FLASH_ATTN and device.type == "cuda" else "sdpa"


def _sdpa(q, k, v, mask=None, causal=False):
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

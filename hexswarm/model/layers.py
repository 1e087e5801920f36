"""One tensor-parallel shard of a Llama decoder layer (fused QKV and gate/up projections)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hexswarm.model.attention import cached_attention, prefill_attention
from hexswarm.model.config import LlamaConfig
from hexswarm.model.kv_cache import KVCache
from hexswarm.model.rope import apply_rotary
from hexswarm.model.shard import TensorShard

AllReduce = Callable[[torch.Tensor], torch.Tensor]


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


def _empty(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayerShard(nn.Module):
    def __init__(self, cfg: LlamaConfig, shard: TensorShard, dtype, device):
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
        self.qkv_weight = _empty((self.q_size + 2 * self.kv_size, H), dtype, device)
        self.qkv_bias = _empty((self.q_size + 2 * self.kv_size,), dtype, device) if cfg.attention_bias else None
        self.o_weight = _empty((H, self.q_size), dtype, device)
        # Row-parallel biases are added once, after the all-reduce.
        self.o_bias = _empty((H,), dtype, device) if cfg.attention_bias else None
        self.gate_up_weight = _empty((2 * self.ffn, H), dtype, device)
        self.gate_up_bias = _empty((2 * self.ffn,), dtype, device) if cfg.mlp_bias else None
        self.down_weight = _empty((H, self.ffn), dtype, device)
        self.down_bias = _empty((H,), dtype, device) if cfg.mlp_bias else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: KVCache,
        layer: int,
        slots,
        start: torch.Tensor,
        total: torch.Tensor,
        fresh: bool,
        all_reduce: AllReduce | None,
    ) -> torch.Tensor:
        """x: [B, T, H] at positions start[b] + [0, T); writes K/V into the cache slots."""
        B, T, _ = x.shape
        h = self.input_norm(x)
        qkv = F.linear(h, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(B, T, self.n_q, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        q = apply_rotary(q.transpose(1, 2), cos, sin).transpose(1, 2)
        k = apply_rotary(k.transpose(1, 2), cos, sin).transpose(1, 2)
        k_cache, v_cache = kv.k[layer], kv.v[layer]
        if T == 1:
            # decode: one new key per row, scattered to each slot's position
            slot_t = slots if isinstance(slots, torch.Tensor) else torch.arange(slots.start, slots.stop, device=x.device)
            k_cache[slot_t, start] = k[:, 0]
            v_cache[slot_t, start] = v[:, 0]
        else:
            for b in range(B):
                slot = (slots.start + b) if isinstance(slots, slice) else int(slots[b])
                s0 = int(start[b])
                k_cache[slot, s0 : s0 + T] = k[b]
                v_cache[slot, s0 : s0 + T] = v[b]
        if fresh:
            attn = prefill_attention(q, k, v)
        else:
            L = int(total.max())
            attn = cached_attention(q, k_cache[slots, :L], v_cache[slots, :L], start, total)
        out = F.linear(attn.reshape(B, T, self.q_size), self.o_weight)
        if all_reduce is not None:
            out = all_reduce(out)
        if self.o_bias is not None:
            out = out + self.o_bias
        x = x + out
        h = self.post_norm(x)
        gate, up = F.linear(h, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, self.down_weight)
        if all_reduce is not None:
            out = all_reduce(out)
        if self.down_bias is not None:
            out = out + self.down_bias
        return x + out

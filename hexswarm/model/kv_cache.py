"""A preallocated KV cache with one slot per in-flight request.

Layout [layers, slots, max_len, kv_heads, head_dim] is what flash-attn's
kvcache kernel reads directly; SDPA reads a transposed view.  Slot lengths are
kept by the caller (the stage runtime), which knows every request's position.
"""

from __future__ import annotations

import torch


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
        shape = (n_layers, n_slots, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_slots = n_slots
        self.max_len = max_len

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def slot_index(slots: list[int], device) -> torch.Tensor | slice:
    """A slice when the slots are consecutive (a view, no copy), else an index tensor."""
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return torch.tensor(slots, dtype=torch.long, device=device)

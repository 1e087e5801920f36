"""A paged KV cache: every stage's keys and values in fixed-size blocks, mapped per request slot.

Pool layout [layers, blocks, BLOCK, kv_heads, head_dim]; `table` [slots + 1, max_blocks] (int32,
on the device) maps a slot's position p to block table[slot, p // BLOCK], offset p % BLOCK.  The
kernels (rotary_store here, decode and chunk attention in attention.py) read the table on the
device, so CUDA graphs replay against whatever blocks the slots hold at the time.

Why paged: a contiguous cache gives every slot max_seq_len positions, so a GPU holds
memory / (max_seq_len x bytes per token) requests however short they are; with blocks a slot holds
only what it uses and `n_tokens` (the pool) is shared.  An MHA 7B at 2k context needs 128 GiB for
128 contiguous slots; 128 requests of 256 tokens need 16 GiB of blocks.

Allocation is host-side and deterministic, so the ranks of a tensor-parallel stage, given the
same rows and frees in the same order, hold the same tables without sending them:
- `prepare(rows)`: before a step, each row (slot, start, length) gets blocks up to start+length;
  a row at start 0 is a new occupant of its slot (a new request, or a resumed one prefilling
  again): the slot's old blocks go back first.  A row at start > 0 on a slot without blocks is a
  stale row of a released request (a step launched before its release): it keeps the table row
  at zeros and writes block 0, the scratch block, which nothing reads.
- `release(slots)`: blocks go back to the pool.  Reuse is safe without waiting for the GPU: every
  step that wrote a released slot was launched earlier on the same stream, and a caller applies
  a step's frees before its rows, with each slot at most once in a step.
Block 0 is the scratch block: the scratch slot (padding rows of CUDA-graph batches) and every
unassigned table entry point at it.

`rotary_store` (CUDA path) applies the rotary embedding to q and k in place in the fused qkv
projection's output and writes k and v into their blocks, one kernel for the whole step.
"""

from __future__ import annotations

import torch

from hexswarm.model import pdl
from hexswarm.model.host_copy import to_device

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the host
    HAVE_TRITON = False

BLOCK = 16  # positions per block (vLLM's default: little waste per request, small tables)


class KVCacheFull(RuntimeError):
    """No free block for a row: the stage holds more than its pool (see kv_tokens)."""


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one position in every layer of a stage."""
    return 2 * n_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def blocks_for(n_tokens: int) -> int:
    return -(-n_tokens // BLOCK)


class KVCache:
    def __init__(
        self,
        n_layers: int,
        max_batch: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        n_tokens: int | None = None,
    ):
        """n_tokens: the pool's capacity in positions (rounded up to whole blocks); default
        max_batch x max_seq_len in whole blocks per slot, what a contiguous cache would hold."""
        self.max_batch = max_batch
        self.scratch_slot = max_batch
        self.max_seq_len = max_seq_len
        self.max_blocks = blocks_for(max_seq_len)
        n_blocks = 1 + (blocks_for(n_tokens) if n_tokens is not None else max_batch * self.max_blocks)
        shape = (n_layers, n_blocks, BLOCK, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.table = torch.zeros((max_batch + 1, self.max_blocks), dtype=torch.int32, device=device)
        self.device = torch.device(device)
        self._free = list(range(n_blocks - 1, 0, -1))  # popped from the end: low blocks first
        self._held: list[list[int]] = [[] for _ in range(max_batch + 1)]

    @property
    def n_blocks(self) -> int:
        """Blocks requests can hold (the scratch block excluded)."""
        return self.k.shape[1] - 1

    def free_blocks(self) -> int:
        return len(self._free)

    def held_blocks(self, slot: int) -> int:
        return len(self._held[slot])

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def release(self, slots) -> None:
        dirty = [s for s in slots if self._held[s]]
        for s in dirty:
            self._give_back(s)
        self._upload(dirty)

    def _give_back(self, slot: int) -> None:
        self._free.extend(reversed(self._held[slot]))
        self._held[slot].clear()

    def prepare(self, rows) -> None:
        """Blocks for a step's rows (slot, start, length); see the module docstring."""
        dirty = []
        for slot, start, length in rows:
            if slot == self.scratch_slot:
                continue
            held = self._held[slot]
            if start == 0 and held:
                self._give_back(slot)
                dirty.append(slot)
            elif start > 0 and not held:
                continue  # a stale row: writes the scratch block
            need = blocks_for(start + length) - len(held)
            if need > 0:
                if need > len(self._free):
                    raise KVCacheFull(f"KV cache full: {self.n_blocks} blocks of {BLOCK} positions all held; "
                                      "raise kv_tokens or lower max_batch")
                held.extend(self._free.pop() for _ in range(need))
                dirty.append(slot)
        self._upload(dirty)

    def _upload(self, slots) -> None:
        if not slots:
            return
        rows = [[s] + self._held[s] + [0] * (self.max_blocks - len(self._held[s])) for s in sorted(set(slots))]
        # one copy through pinned memory: queued on the stream after the steps already launched, as a kernel
        t = to_device(rows, torch.int32, self.device)
        self.table.index_copy_(0, t[:, 0].long(), t[:, 1:])

    def positions(self, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Flat index into a layer's pool viewed [blocks * BLOCK, heads, dim] of (slot, pos) pairs
        (broadcast shapes)."""
        return self.table[slots, pos // BLOCK].long() * BLOCK + pos % BLOCK

    def _flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's K and V pools viewed [blocks * BLOCK, heads, dim], indexed by `positions`."""
        return self.k[layer].flatten(0, 1), self.v[layer].flatten(0, 1)

    def write(self, layer: int, idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [..., heads, dim] at flat positions idx [...] (see `positions`)."""
        k_pool, v_pool = self._flat(layer)
        k_pool[idx] = k
        v_pool[idx] = v

    def gather(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, length) of `slots` [B]: two [B, length, heads, dim] views of
        copies.  Whole blocks are copied (one index per block, not per position: 2.5x faster on a CPU at
        32 rows of 200 positions), then cut to `length`."""
        n = blocks_for(length)
        ids = self.table[slots, :n].long().view(-1)
        shape = (slots.shape[0], n * BLOCK) + tuple(self.k.shape[3:])
        k = self.k[layer].index_select(0, ids).view(shape)[:, :length]
        v = self.v[layer].index_select(0, ids).view(shape)[:, :length]
        return k, v


if HAVE_TRITON:

    @triton.jit
    def rotary_mix(f, partner, c, s, dt: tl.constexpr):
        """One rotated value in dtype dt: f * cos + partner * sin (f, partner in fp32; partner = -x2 for
        the first half of a head, x1 for the second: rotate_half), each product and the sum rounded to
        dt as torch rounds them.  The one rounding rule of the rotary, here and in the decode attention."""
        return ((f * c).to(dt).to(tl.float32) + (partner * s).to(dt).to(tl.float32)).to(dt)

    @triton.jit
    def _rotate(x_ptr, offs_h, d, HALF: tl.constexpr, c, s, mask):
        # x*cos + rotate_half(x)*sin for heads offs_h, as halves
        x1 = tl.load(x_ptr + offs_h[:, None] + d[None, :], mask=mask, other=0.0)
        x2 = tl.load(x_ptr + offs_h[:, None] + HALF + d[None, :], mask=mask, other=0.0)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        return rotary_mix(f1, -f2, c, s, x1.dtype), rotary_mix(f2, f1, c, s, x1.dtype)

    @triton.jit
    def _rotary_store_kernel(
        qkv_ptr, cos_ptr, sin_ptr, slot_ptr, pos_ptr, kc_ptr, vc_ptr, table_ptr,
        stride_row, stride_blk, stride_cl, stride_tab,
        NQ: tl.constexpr, NKV: tl.constexpr, HALF: tl.constexpr,
        BQ: tl.constexpr, BKV: tl.constexpr, BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr,
    ):
        pdl.release(PDL)
        pdl.wait(PDL)  # everything it reads was written by earlier kernels (model/pdl.py)
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
            blk = tl.load(table_ptr + slot * stride_tab + pos // BLOCK_SIZE).to(tl.int64)
            hk = tl.arange(0, BKV)
            mk = (hk < NKV)[:, None]
            base = row + NQ * D
            dest = blk * stride_blk + (pos % BLOCK_SIZE) * stride_cl + hk[:, None] * D
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


def rotary_store(qkv, cos_half, sin_half, tok_slot, tok_pos, k_cache, v_cache, table, n_q: int, n_kv: int) -> None:
    """qkv: [N, (n_q + 2 n_kv) * D] contiguous; cos_half/sin_half: [max_pos, D/2] float32
    (already rounded to the model dtype, as transformers rounds them); tok_slot/tok_pos: [N]
    long; k_cache/v_cache: [blocks, BLOCK, n_kv, D] (one layer); table: the cache's block table."""
    N = qkv.shape[0]
    half = cos_half.shape[1]
    assert qkv.stride(1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert tok_slot.is_contiguous() and tok_pos.is_contiguous() and cos_half.is_contiguous()
    assert table.is_contiguous() and k_cache.shape[1] == BLOCK
    _rotary_store_kernel[(N, 3)](
        qkv, cos_half, sin_half, tok_slot, tok_pos, k_cache, v_cache, table,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), table.stride(0),
        NQ=n_q, NKV=n_kv, HALF=half, BQ=triton.next_power_of_2(n_q), BKV=triton.next_power_of_2(n_kv),
        BLOCK_SIZE=BLOCK, num_warps=4, **pdl.launch_kwargs(qkv.device),
    )

"""torch's own int4 kernel ("tinygemm", `aten._weight_int4pack_mm`, as gpt-fast serves int4) for
decode steps of a few rows: HEXSWARM_QUANT_BACKEND=tinygemm.

Measured on an H100 (docs/BENCHMARKS.md run 22, issue 14): at one row it reads an int4 weight at
0.59 of the copy bandwidth against 0.34 for our Triton GEMV (quant_kernels.py), so batch-1 decode
is much faster (7B: 2.88 against 4.64 ms a step); from 16 rows on it is slower than ours (2.5x at
32 rows: it pads rows to its MMA tiles).  So an int4 QuantLinear served this way keeps its own
layout too (ours serves steps of more than MAX_ROWS rows, and prefill) and adds tinygemm's: +0.625
bytes per weight, which `QuantLinear.nbytes` counts.  Latency over memory: an opt-in, not the default.

Format: tinygemm dequantizes w = (q - 8) * scale + zero with bf16 scale and zero per group of 32
along K, so zero = offset + 8 * scale (GGUF Q4_1 and `--quantize int4`) or 0 (Q4_0).  Scales
become bf16 (ours are fp16): within bf16 rounding of the weight, as our "deq" kernel rounds it.
It takes bf16 activations only; other dtypes use ours.
"""

from __future__ import annotations

import torch

from hexswarm.model.quant_format import GROUP

MAX_ROWS = 8  # steps of at most this many rows use tinygemm (measured: faster at 1 and 8, slower at 32)
INNER_K_TILES = 2  # tinygemm's K tiling (2, 4 or 8): 2 measured fastest at one row on the H100


def available(device: torch.device) -> bool:
    """tinygemm is in this torch build and runs on this device (CUDA, compute capability 8.0+)."""
    if device.type != "cuda" or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def fits(w) -> bool:
    """Shapes tinygemm takes: int4, N a multiple of 8 and K of its K tile."""
    return w.bits == 4 and w.out_features % 8 == 0 and w.in_features % (16 * INNER_K_TILES) == 0


class TinygemmWeight:
    """An int4 QuantLinear's weight in tinygemm's layout: `packed` (opaque, from torch's converter)
    and `scales_zeros` bf16 [K/32, N, 2]."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, in_features: int, out_features: int):
        self.packed, self.scales_zeros = packed, scales_zeros
        self.in_features, self.out_features = in_features, out_features

    def takes(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether this layout serves `rows` rows of x in `dtype`: bf16 (tinygemm's only activation
        dtype), at most MAX_ROWS rows."""
        return dtype == torch.bfloat16 and rows <= MAX_ROWS

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_zeros))

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        mm = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(x2.contiguous(), self.packed, GROUP, self.scales_zeros)
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], self.out_features)


def convert(w, inner_k_tiles: int = INNER_K_TILES) -> TinygemmWeight:
    """w (an int4 QuantLinear, `fits`) in tinygemm's layout on w's device.  On a CPU it uses torch's
    CPU twin of the kernel (same formula, its own packing): the tests check the conversion there."""
    from hexswarm.model.quant import unpack_int4

    codes = unpack_int4(w.qweight).to(torch.int32)  # [N, K], 0..15
    if w.qweight.is_cuda:  # two codes a byte, the even column in the high nibble (checked on an H100)
        packed = torch.ops.aten._convert_weight_to_int4pack(
            (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous(), inner_k_tiles)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), inner_k_tiles)
    scale = w.scale.float()
    zero = w.offset.float() + 8.0 * scale if w.offset is not None else torch.zeros_like(scale)
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return TinygemmWeight(packed, scales_zeros, w.in_features, w.out_features)

"""Triton kernels for `QuantLinear` (format in model/quant.py): a dequantize-inside GEMV for
decode (up to 16 rows) and a dequantize-to-dense kernel for prefill / large batches.

The GEMV reads each packed weight once, dequantizes a [BLOCK_N, BLOCK_K] tile in registers
(fp32, as the reference does), rounds it to the activation dtype and multiplies on the
tensor cores with fp32 accumulation: the same rounding as "dequantize to bf16, then
F.linear", so the two agree to summation order.  Rows of x beyond M are masked (tl.dot
needs 16 rows; decode is memory-bound, the idle rows cost nothing that matters).

Every kernel argument is a pointer or a shape fixed for a given batch size, so calls are
captured in CUDA graphs as they are (see cuda_graphs.py).
"""

from __future__ import annotations

import logging

import torch

from hexswarm.model.quant import GROUP

log = logging.getLogger("hexswarm.quant")
FAILURE: str | None = None  # why the kernels were turned off in this process, if they were

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except Exception:  # pragma: no cover - CPU-only hosts
    AVAILABLE = False

if AVAILABLE:

    @triton.jit
    def _load_weight_tile(q_ptr, s_ptr, o_ptr, rn, rk, mask, K, BITS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                          GROUP_SIZE: tl.constexpr):
        """Dequantized fp32 tile w[rn, rk] (rn [BN, 1], rk [1, BK]), computed as quant.py's reference."""
        groups = K // GROUP_SIZE
        g = rk // GROUP_SIZE
        s = tl.load(s_ptr + rn * groups + g, mask=mask, other=0.0).to(tl.float32)
        if BITS == 8:
            q = tl.load(q_ptr + rn * K + rk, mask=mask, other=0).to(tl.float32)
            w = q * s
        else:
            j = rk % GROUP_SIZE
            byte = tl.load(q_ptr + rn * (K // 2) + g * (GROUP_SIZE // 2) + (j % (GROUP_SIZE // 2)), mask=mask, other=0)
            q = ((byte.to(tl.int32) >> ((j // (GROUP_SIZE // 2)) * 4)) & 0x0F).to(tl.float32)
            if HAS_OFFSET:
                o = tl.load(o_ptr + rn * groups + g, mask=mask, other=0.0).to(tl.float32)
                w = q * s + o
            else:
                w = (q - 8.0) * s
        return w

    @triton.jit
    def _qgemv_kernel(x_ptr, q_ptr, s_ptr, o_ptr, b_ptr, y_ptr, M, N, K,
                      BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_m = rm < M
        mask_n = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = _load_weight_tile(q_ptr, s_ptr, o_ptr, rn[:, None], rk[None, :], mask_n[:, None] & mask_k[None, :],
                                  K, BITS, HAS_OFFSET, GROUP_SIZE)
            acc += tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)))
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, o_ptr, w_ptr, N, K, BITS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                        GROUP_SIZE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        w = _load_weight_tile(q_ptr, s_ptr, o_ptr, rn[:, None], rk[None, :], mask, K, BITS, HAS_OFFSET, GROUP_SIZE)
        tl.store(w_ptr + rn[:, None] * K + rk[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


# (BLOCK_N, BLOCK_K, num_warps, num_stages): small N tiles give enough programs to keep every SM
# streaming weights at decode (N = 4096 -> 256 programs); tools/bench_quant.py measures them.
GEMV_CONFIG = {8: (16, 128, 4, 3), 4: (16, 256, 4, 3)}


def gemv(x: torch.Tensor, w, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] (at most 16 rows) @ dequant(w).T (+ bias) -> [..., N] in x's dtype."""
    K, N = w.in_features, w.out_features
    x2 = x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = GEMV_CONFIG[w.bits]
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, 16))
    offset = w.offset if w.offset is not None else w.scale
    _qgemv_kernel[grid](x2, w.qweight, w.scale, offset, bias if bias is not None else x2, y, M, N, K,
                        BITS=w.bits, HAS_OFFSET=w.offset is not None, HAS_BIAS=bias is not None, GROUP_SIZE=GROUP,
                        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y.view(*x.shape[:-1], N)


def dequantize(w, dtype: torch.dtype) -> torch.Tensor:
    """The dense [N, K] weight in `dtype` (for GEMMs over many rows)."""
    N, K = w.out_features, w.in_features
    out = torch.empty(N, K, dtype=dtype, device=w.qweight.device)
    block_n, block_k = 32, 128
    offset = w.offset if w.offset is not None else w.scale
    _dequant_kernel[(triton.cdiv(N, block_n), triton.cdiv(K, block_k))](
        w.qweight, w.scale, offset, out, N, K, BITS=w.bits, HAS_OFFSET=w.offset is not None, GROUP_SIZE=GROUP,
        BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4)
    return out


def disable(error: Exception) -> None:
    """Turn the kernels off for this process (QuantLinear then dequantizes in torch), once, loudly.
    Compilation happens on a step's first call, before any CUDA graph capture."""
    global AVAILABLE, FAILURE
    AVAILABLE = False
    FAILURE = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    log.warning("quantized Triton kernels failed (%s); dequantizing in torch instead (slower)", FAILURE)

"""Triton kernels for `QuantLinear` (format in model/quant.py): a dequantize-inside GEMV for
decode batches (up to the largest M bucket with a config below) and a dequantize-to-dense
kernel for prefill.

Memory-bound design: a program streams a [BLOCK_N rows, BLOCK_G groups] block of packed
weights per step as 16-byte vectors per (row, group) half: for int4 the 16 packed bytes of
a group, whose low nibbles are the group's columns 0..15 and high nibbles columns 16..31
(quant.py's layout), so each byte is loaded once and feeds two weights; for int8 the two
16-byte halves.  Scales (and offsets) are loaded once per (row, group).  The next block's
bytes are loaded before the current one is computed (a manual prefetch: the loads are not
dot operands, so Triton's pipeliner would not overlap them).  Split-K (several programs per
output tile, each writing its fp32 partial sums to its own plane of a workspace, summed in
split order by one torch reduction and cast: no atomics, so a step gives the same bits every
time) gives small N enough programs to keep every SM streaming: a config names WAVES, and K is split until the grid
has WAVES programs per SM, so one config serves N = 4096 and N = 22016 alike.

Two reduction paths, picked by BLOCK_M:
* BLOCK_M == 1 (batch-1 decode): one program per row of x, plain FMAs into a
  [BLOCK_N, BLOCK_G, 16] fp32 accumulator reduced once at the end (tl.dot would pad M to 16).
* BLOCK_M >= 16: tl.dot(W tile [BLOCK_N, K'], x tile [K', BLOCK_M]) ("swap AB": the weight
  rows fill the MMA's 16+ row side, the few batch rows its narrow side).

Numerics, both paths: the weight is dequantized in fp32 exactly as quant.py's reference
(q * scale [+ offset]; int -> float via exponent bits, exact for these ranges), rounded to
the activation dtype, and multiplied with fp32 accumulation: "dequantize to bf16, then
F.linear" up to summation order (split-K adds its partial sums in split order, after the kernel).

A second M = 1 kernel, the "fact" variant (_qgemv_fact_kernel; a config's 7th field picks it,
6-field configs are the kernel above, "deq"): per (row, group) sum_j w_j x_j =
scale * (sum_j f_j x_j - C) + offset * X, where f_j = B_j + code_j is the code turned into a float
by OR-ing it into the mantissa of a power of two B_j (no subtraction), and C = sum_j B_j x_j,
X = sum_j x_j come from the activations once per thread and group.  The loop then costs per weight
a shift shared by several codes, one LOP3 and one FFMA (~3.6-4.6 SASS instructions per weight
including loads and reductions, against ~10 for "deq", whose weights also go through shared
memory; sm_90, Triton 3.6).  Numerics: fp32 products of unrounded weights (no rounding to the
activation dtype), fp32 sums; within the same tolerance of the reference.
Its "stream" tiles (variant "stream"; the exact batch-1 config on the H100): one weight row and one
warp per program, the whole K, no split-K (so no zeroed buffer, atomics or cast: one kernel per
projection), group partial sums added after the loop; the wide tiles' instruction count does not
hold there (~9 SASS instructions per int4 weight, ~12 per int8: the activations are unpacked per
row, and Triton moves them between the weights' and their own layout), but a warp streams a row
as a plain read does (BENCHMARKS run 26).  On Hopper it launches with PDL (model/pdl.py).

A third kernel, "dp4a" (_qgemv_dp4a_kernel; the served config at M = 1 for int4 and int8 and at M = 8
for int8 on the H100, BENCHMARKS run 27): the activations are rounded to int8 per group of 32 with
an fp32 scale and the group's exact sum (llama.cpp's Q8_1; `Int8Rows`), and each 4-byte word of codes
meets a word of activations in one dp4a instruction: per weight a quarter instruction (int4: plus
half a shift-and-mask), against ~9 for "stream", so the loop is bound by memory again.  The kernels
that produce a projection's input write its int8 rows beside it (store_int8_groups: add+RMSNorm,
SiLU*up, the decode attention's combine; quant.int8_rows_for says where), else `quantize_rows` does
(one small kernel).  Numerics: not the reference's: each activation is off by up to half its
group's step (amax / 254), a relative error of ~1e-2 of a projection's output at worst on random
data; SmolLM2's greedy tokens agree with the dequantized model on 61 of 64 steps (64 of 64 for the
exact kernels).  HEXSWARM_INT8_ACTIVATIONS=0 serves the exact kernels instead (EXACT_CONFIGS).
"dp4a_late" (LATE_WORDS): the same kernel summing a group's words after the loop, for several rows of x
(a tuner candidate; see its docstring).

Every kernel argument is a pointer or a shape fixed for a given batch size, so calls are
captured in CUDA graphs as they are (see cuda_graphs.py).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple

import torch

from hexswarm.model import pdl
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
    def _load(ptr, mask, MASKED: tl.constexpr):
        """tl.load, its mask (zeros outside) only where MASKED."""
        if MASKED:
            return tl.load(ptr, mask=mask, other=0)
        else:
            return tl.load(ptr)

    @triton.jit
    def _next_groups(g0, g_end, gr, BLOCK_G: tl.constexpr, EVEN: tl.constexpr):
        """The groups whose loads go out before the current block's math: the next block's (after the
        last block: fully masked, or when EVEN the last block again, a cache hit)."""
        if EVEN:
            return tl.minimum(g0 + BLOCK_G, g_end - BLOCK_G) + gr
        else:
            return g0 + gr + BLOCK_G

    @triton.jit
    def _load_packed(q_ptr, s_ptr, o_ptr, rn, g, rmask, gmask, K, BITS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                     GROUP_SIZE: tl.constexpr, MASKED: tl.constexpr):
        """Raw codes of groups g (1D) for rows rn (1D): (lo, hi, scale, offset) where lo/hi are
        [BN, BG, GROUP/2] (int4: lo is the packed bytes and hi unused) and scale/offset
        [BN, BG, 1] fp32 (offset = scale when there is none: never used then).  MASKED=False:
        every index is in range (no mask math in the hot loop)."""
        HALF: tl.constexpr = GROUP_SIZE // 2
        groups = K // GROUP_SIZE
        j = tl.arange(0, HALF)[None, None, :]
        rn3 = rn[:, None, None]
        g3 = g[None, :, None]
        m3 = rmask[:, None, None] & gmask[None, :, None] if MASKED else None
        if BITS == 8:
            base = q_ptr + rn3 * K + g3 * GROUP_SIZE + j
            lo = _load(base, m3, MASKED)
            hi = _load(base + HALF, m3, MASKED)
        else:
            lo = _load(q_ptr + rn3 * (K // 2) + g3 * HALF + j, m3, MASKED)
            hi = lo
        m2 = rmask[:, None] & gmask[None, :] if MASKED else None
        sidx = rn[:, None] * groups + g[None, :]
        s = _load(s_ptr + sidx, m2, MASKED).to(tl.float32)[:, :, None]
        if HAS_OFFSET:
            o = _load(o_ptr + sidx, m2, MASKED).to(tl.float32)[:, :, None]
        else:
            o = s
        return lo, hi, s, o

    @triton.jit
    def _dequant_packed(lo, hi, s, o, BITS: tl.constexpr, HAS_OFFSET: tl.constexpr):
        """fp32 weights of a group's columns 0..15 and 16..31 from _load_packed's codes.

        Codes become floats through the exponent bits (2^23 + c has c in its mantissa),
        integer ops at full rate instead of the slower int->float conversion; the subtraction
        is exact, so w = q * scale (+ offset) is computed as the reference computes it."""
        MAGIC: tl.constexpr = 0x4B000000  # bits of 2^23
        if BITS == 8:  # int8 c in [-128, 127] -> 2^23 + 128 + c
            a = (lo.to(tl.int32) + (MAGIC + 128)).to(tl.float32, bitcast=True) - 8388736.0
            b = (hi.to(tl.int32) + (MAGIC + 128)).to(tl.float32, bitcast=True) - 8388736.0
            return a * s, b * s
        else:
            byte = lo.to(tl.int32)
            if HAS_OFFSET:  # Q4_1 / --quantize int4: q * d + m
                a = ((byte & 0x0F) | MAGIC).to(tl.float32, bitcast=True) - 8388608.0
                b = ((byte >> 4) | MAGIC).to(tl.float32, bitcast=True) - 8388608.0
                return a * s + o, b * s + o
            else:  # Q4_0: (q - 8) * d, the 8 folded into the exact subtraction
                a = ((byte & 0x0F) | MAGIC).to(tl.float32, bitcast=True) - 8388616.0
                b = ((byte >> 4) | MAGIC).to(tl.float32, bitcast=True) - 8388616.0
                return a * s, b * s

    @triton.jit
    def _qgemv_kernel(x_ptr, q_ptr, s_ptr, o_ptr, b_ptr, y_ptr, M, N, K, groups_per_split,
                      BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                      ROUND_W: tl.constexpr, EVEN: tl.constexpr, GROUP_SIZE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
        """y[m, n] (+)= sum_k x[m, k] * w[n, k] over this program's groups
        [pid_k * groups_per_split, +groups_per_split); PARTIAL: y is an fp32 [splits, M, N] workspace,
        this program's sums go to plane pid_k.
        EVEN: N a multiple of BLOCK_N and every program's groups a multiple of BLOCK_G."""
        HALF: tl.constexpr = GROUP_SIZE // 2
        pid_m = tl.program_id(0)  # fastest: the programs sharing a weight tile run together (L2)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        groups = K // GROUP_SIZE
        g_start = pid_k * groups_per_split
        g_end = tl.minimum(groups, g_start + groups_per_split)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # int32: gemv_config bounds the sizes
        nmask = rn < N
        act = x_ptr.dtype.element_ty
        if BLOCK_M == 1:
            acc = tl.zeros((BLOCK_N, BLOCK_G, HALF), dtype=tl.float32)
            j3 = tl.arange(0, HALF)[None, None, :]
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            mmask = rm < M
            kk = tl.arange(0, BLOCK_G * HALF)  # a half's columns of BLOCK_G groups, as the dot's K
            xcol = (kk // HALF) * GROUP_SIZE + kk % HALF
        gr = tl.arange(0, BLOCK_G)
        lo, hi, s, o = _load_packed(q_ptr, s_ptr, o_ptr, rn, g_start + gr, nmask, g_start + gr < g_end, K, BITS,
                                    HAS_OFFSET, GROUP_SIZE, not EVEN)
        for g0 in range(g_start, g_end, BLOCK_G):
            g = g0 + gr
            gmask = g < g_end
            gn = _next_groups(g0, g_end, gr, BLOCK_G, EVEN)
            nlo, nhi, ns, no = _load_packed(q_ptr, s_ptr, o_ptr, rn, gn, nmask, gn < g_end, K, BITS, HAS_OFFSET,
                                            GROUP_SIZE, not EVEN)
            wa, wb = _dequant_packed(lo, hi, s, o, BITS, HAS_OFFSET)
            if BLOCK_M == 1:
                xp = x_ptr + pid_m * K + g[None, :, None] * GROUP_SIZE + j3
                xa = _load(xp, gmask[None, :, None], not EVEN).to(tl.float32)
                xb = _load(xp + HALF, gmask[None, :, None], not EVEN).to(tl.float32)
                if ROUND_W:
                    wa = wa.to(act).to(tl.float32)
                    wb = wb.to(act).to(tl.float32)
                acc += wa * xa  # two statements: two FFMAs (one expression compiles to FMUL + FFMA + FADD)
                acc += wb * xb
            else:
                xp = x_ptr + rm[None, :] * K + (g0 * GROUP_SIZE + xcol)[:, None]
                xm = mmask[None, :] & (g0 + kk // HALF < g_end)[:, None]
                xa = tl.load(xp, mask=xm, other=0.0)
                xb = tl.load(xp + HALF, mask=xm, other=0.0)
                acc = tl.dot(tl.reshape(wa.to(act), (BLOCK_N, BLOCK_G * HALF)), xa, acc)
                acc = tl.dot(tl.reshape(wb.to(act), (BLOCK_N, BLOCK_G * HALF)), xb, acc)
            lo, hi, s, o = nlo, nhi, ns, no
        if BLOCK_M == 1:
            out = tl.sum(tl.sum(acc, axis=2), axis=1)
            if HAS_BIAS:
                bias = tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
                out += tl.where(pid_k == 0, bias, 0.0)  # split-K: added once
            yp = y_ptr + pid_m * N + rn
            ymask = nmask
        else:
            out = acc
            if HAS_BIAS:
                bias = tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
                out += tl.where(pid_k == 0, bias, 0.0)[:, None]
            yp = y_ptr + rm[None, :] * N + rn[:, None]
            ymask = nmask[:, None] & mmask[None, :]
        if PARTIAL:
            tl.store(yp + pid_k.to(tl.int64) * M * N, out, mask=ymask)
        else:
            tl.store(yp, out.to(y_ptr.dtype.element_ty), mask=ymask)

    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, o_ptr, w_ptr, N, K, BITS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                        GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
        HALF: tl.constexpr = GROUP_SIZE // 2
        rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        nmask = rn < N
        gmask = g < K // GROUP_SIZE
        lo, hi, s, o = _load_packed(q_ptr, s_ptr, o_ptr, rn, g, nmask, gmask, K, BITS, HAS_OFFSET, GROUP_SIZE, True)
        wa, wb = _dequant_packed(lo, hi, s, o, BITS, HAS_OFFSET)
        wp = w_ptr + rn[:, None, None] * K + g[None, :, None] * GROUP_SIZE + tl.arange(0, HALF)[None, None, :]
        m3 = nmask[:, None, None] & gmask[None, :, None]
        tl.store(wp, wa.to(w_ptr.dtype.element_ty), mask=m3)
        tl.store(wp + HALF, wb.to(w_ptr.dtype.element_ty), mask=m3)

    # ---- the factored GEMV (variant "fact"): scales out of the inner loop -------------------------
    @triton.jit
    def _load_words(q_ptr, s_ptr, o_ptr, rn, g, rmask, gmask, K, WORDS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                    GROUP_SIZE: tl.constexpr, MASKED: tl.constexpr):
        """The packed codes of groups g (1D) for rows rn (1D) as int32 words [BN, BG, WORDS]
        (q_ptr: the weight viewed as int32), and scale / offset [BN, BG, 1] fp32 (offset = scale
        when there is none: never used then)."""
        groups = K // GROUP_SIZE
        i = tl.arange(0, WORDS)[None, None, :]
        m3 = rmask[:, None, None] & gmask[None, :, None] if MASKED else None
        words = _load(q_ptr + rn[:, None, None] * (groups * WORDS) + g[None, :, None] * WORDS + i, m3, MASKED)
        # scales as [BN, BG, 1] (not [BN, BG] expanded): Triton then lays them out as the words
        m1 = rmask[:, None, None] & gmask[None, :, None] if MASKED else None
        sidx = rn[:, None, None] * groups + g[None, :, None]
        s = _load(s_ptr + sidx, m1, MASKED).to(tl.float32)
        if HAS_OFFSET:
            o = _load(o_ptr + sidx, m1, MASKED).to(tl.float32)
        else:
            o = s
        return words, s, o

    @triton.jit
    def _code(src, MASK: tl.constexpr, BITS_XOR):
        """A code field already at its place in the mantissa, as a float: (src & MASK) ^ BITS_XOR
        is B + code (BITS_XOR: the magic exponent of 2^E = B, and for int8 the sign flip)."""
        return ((src & MASK) ^ BITS_XOR).to(tl.float32, bitcast=True)

    @triton.jit
    def _x4(q, BF16: tl.constexpr):
        """Four activations packed in an 8-byte word (bf16 or fp16) as fp32."""
        lo = q.to(tl.int32)
        hi = (q >> 32).to(tl.int32)
        if BF16:  # a bf16 is the top half of its fp32
            return ((lo << 16).to(tl.float32, bitcast=True), (lo & -65536).to(tl.float32, bitcast=True),
                    (hi << 16).to(tl.float32, bitcast=True), (hi & -65536).to(tl.float32, bitcast=True))
        else:
            return (lo.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                    (lo >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                    hi.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                    (hi >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32))

    @triton.jit
    def _fact_partial(words, x_row, g, gmask, magic, BITS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                      GROUP_SIZE: tl.constexpr, MASKED: tl.constexpr, BF16: tl.constexpr):
        """For the words [BN, BG, WORDS] of groups g: (A [BN, BG, 1], C and X [1, BG, 1]) with
        sum_j w_j x_j = scale * (A - C) + offset * X per (row, group): A = sum_j f_j x_j where
        f_j = B_j + code_j is the code made a float by the exponent-bits trick without the usual
        subtraction (B_j a power of two fixed per bit position), C = sum_j B_j x_j (+ 8 X for Q4_0,
        whose weights are scale * (code - 8)), X = sum_j x_j.  Per weight: a shift shared by
        several codes, one LOP3 (mask and magic), one FFMA.

        Precision: |B_j| <= 2^11 (int4) / 2^15 (int8) against codes of ~8 / ~36, so A's fp32
        rounding costs at most ~2^-13 of the exact sum: far below bf16's 2^-9."""
        WORDS: tl.constexpr = GROUP_SIZE * BITS // 32
        m3 = gmask[None, :, None] if MASKED else None
        # x as [1, BG, 4] tensors of 8-byte words (4 consecutive activations; the words' layout, so
        # that no value changes threads), elements 4i..4i+3 of each group's half h (int4) or of
        # the group (int8, i up to 7): one load per 4 activations
        xq_ptr = x_row.to(tl.pointer_type(tl.int64), bitcast=True)
        w = words.to(tl.uint32, bitcast=True)  # logical shifts
        if BITS == 4:
            xq = xq_ptr + g[None, :, None] * (GROUP_SIZE // 4) + tl.arange(0, 4)[None, None, :]
            xa0, xa1, xa2, xa3 = _x4(_load(xq, m3, MASKED), BF16)  # elements 4i + b, h = 0
            xb0, xb1, xb2, xb3 = _x4(_load(xq + 4, m3, MASKED), BF16)  # elements 16 + 4i + b, h = 1
            # word i of a group holds bytes 4i..4i+3; nibble k = 2b + h of the word (bits 4k..4k+3)
            # is element 16h + 4i + b (quant.py's layout).  Nibbles go to bits 12..15 (2^11 + q)
            # or 16..19 (2^7 + q): w itself has nibbles 3 and 4 there, w << 8 nibbles 1 and 2,
            # w >> 8 nibbles 5 and 6, w rotated by 16 nibbles 7 and 0.
            t = w << 8
            u = w >> 8
            v = (w << 16) | (w >> 16)
            M12: tl.constexpr = 0xF000
            M16: tl.constexpr = 0xF0000
            E16 = magic  # 2^7: mantissa bit 16 weighs 1
            E12 = magic + (4 << 23)  # 2^11: mantissa bit 12 weighs 1
            a = _code(v, M16, E16) * xa0  # separate statements: one FFMA each
            a += _code(t, M12, E12) * xb0
            a += _code(t, M16, E16) * xa1
            a += _code(w, M12, E12) * xb1
            a += _code(w, M16, E16) * xa2
            a += _code(u, M12, E12) * xb2
            a += _code(u, M16, E16) * xa3
            a += _code(v, M12, E12) * xb3
            s12 = tl.sum((xb0 + xb1) + (xb2 + xb3), axis=2, keep_dims=True)
            s16 = tl.sum((xa0 + xa1) + (xa2 + xa3), axis=2, keep_dims=True)
            xs = s12 + s16
            c = 2048.0 * s12 + 128.0 * s16
            if not HAS_OFFSET:
                c += 8.0 * xs
        else:
            # word i holds elements 4i..4i+3, byte k at bits 8k; each byte goes to bits 8..15 with
            # its sign bit flipped: 2^15 + 128 + code
            xq = xq_ptr + g[None, :, None] * (GROUP_SIZE // 4) + tl.arange(0, WORDS)[None, None, :]
            x0, x1, x2, x3 = _x4(_load(xq, m3, MASKED), BF16)
            M8: tl.constexpr = 0xFF00
            E8 = magic + ((8 << 23) | 0x8000)
            a = _code(w << 8, M8, E8) * x0
            a += _code(w, M8, E8) * x1
            a += _code(w >> 8, M8, E8) * x2
            a += _code(w >> 16, M8, E8) * x3
            xs = tl.sum((x0 + x1) + (x2 + x3), axis=2, keep_dims=True)
            c = 32896.0 * xs
        return tl.sum(a, axis=2, keep_dims=True), c, xs

    @triton.jit
    def _qgemv_fact_kernel(x_ptr, q_ptr, s_ptr, o_ptr, b_ptr, y_ptr, N, K, groups_per_split, magic,
                           BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                           PARTIAL: tl.constexpr, EVEN: tl.constexpr, GROUP_SIZE: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, LATE_SUM: tl.constexpr,
                           PDL: tl.constexpr):
        """The "fact" variant of _qgemv_kernel at M = 1 (one program per row of x, as there):
        per (row, group) sum_j w_j x_j = scale * (A - C) + offset * X (see _fact_partial), so
        the inner loop has no per-weight scale, offset, subtraction or rounding.
        PDL (model/pdl.py): the first block of weights is loaded before waiting for the kernel
        before, whose output x is read only after.
        LATE_SUM (variant "stream"): partial sums kept per (row, group) and added across groups
        once after the loop, for tiles of few rows and many groups whose groups lie in different
        threads (a reader's layout: a warp streams one row's bytes); else per block, in-thread."""
        WORDS: tl.constexpr = GROUP_SIZE * BITS // 32
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        groups = K // GROUP_SIZE
        g_start = pid_k * groups_per_split
        g_end = tl.minimum(groups, g_start + groups_per_split)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        x_row = x_ptr + pid_m * K
        acc = tl.zeros((BLOCK_N, BLOCK_G if LATE_SUM else 1), dtype=tl.float32)
        gr = tl.arange(0, BLOCK_G)
        pdl.release(PDL)
        words, s, o = _load_words(q_ptr, s_ptr, o_ptr, rn, g_start + gr, nmask, g_start + gr < g_end, K, WORDS,
                                  HAS_OFFSET, GROUP_SIZE, not EVEN)
        pdl.wait(PDL)
        for g0 in range(g_start, g_end, BLOCK_G):
            g = g0 + gr
            gmask = g < g_end
            gn = _next_groups(g0, g_end, gr, BLOCK_G, EVEN)
            nwords, ns, no = _load_words(q_ptr, s_ptr, o_ptr, rn, gn, nmask, gn < g_end, K, WORDS, HAS_OFFSET,
                                         GROUP_SIZE, not EVEN)
            a, c, xs = _fact_partial(words, x_row, g, gmask, magic, BITS, HAS_OFFSET, GROUP_SIZE, not EVEN,
                                     x_ptr.dtype.element_ty == tl.bfloat16)
            part = s * (a - c)
            if HAS_OFFSET:
                part += o * xs
            if LATE_SUM:
                acc += tl.sum(part, axis=2)
            else:
                # in-thread: a thread holds its rows' groups
                acc += tl.sum(tl.sum(part, axis=2), axis=1, keep_dims=True)
            words, s, o = nwords, ns, no
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            bias = tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
            out += tl.where(pid_k == 0, bias, 0.0)
        yp = y_ptr + pid_m * N + rn
        if PARTIAL:  # plane pid_k of an fp32 [splits, M, N] workspace (one program per row of x: M of them)
            tl.store(yp + pid_k.to(tl.int64) * tl.num_programs(0) * N, out, mask=nmask)
        else:
            tl.store(yp, out.to(y_ptr.dtype.element_ty), mask=nmask)


    # ---- the int8-activation GEMV (variant "dp4a"): four multiply-adds per instruction ------------
    @triton.jit
    def _dp4a(a, b, c, A_SIGNED: tl.constexpr, ASM: tl.constexpr):
        """c + the dot product of the four bytes of int32 words a and b (b signed; a signed or not).
        ASM: the dp4a instruction (NVIDIA, sm_61+); else the same sum in plain integer ops (Triton's
        interpreter, which runs no PTX, and ROCm)."""
        if ASM:
            if A_SIGNED:
                return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            else:
                return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                                 dtype=tl.int32, is_pure=True, pack=1)
        else:
            for i in tl.static_range(4):
                if A_SIGNED:
                    ai = (a << (24 - 8 * i)) >> 24
                else:
                    ai = (a >> (8 * i)) & 0xFF
                c += ai * ((b << (24 - 8 * i)) >> 24)
            return c

    @triton.jit
    def store_int8_groups(v, codes_ptr, scales_ptr, sums_ptr, row, col0, K, SIZE: tl.constexpr,
                          GROUP_SIZE: tl.constexpr):
        """Row `row`'s values v [SIZE] (fp32) at columns col0.. (col0 and SIZE multiples of GROUP_SIZE;
        columns >= K dropped) as int8 rows [M, K] per group of GROUP_SIZE: scale = amax / 127,
        code = round-half-even(v * 127 / amax), sum = the group's exact fp32 sum (llama.cpp's Q8_1
        activations; quant.quantize_activations is the reference).  Producer kernels (add+RMSNorm,
        SiLU*up, the attention's combine) call it on what they store, for a "dp4a" GEMV after them."""
        NG: tl.constexpr = SIZE // GROUP_SIZE
        vg = tl.reshape(v, (NG, GROUP_SIZE))
        amax = tl.max(tl.abs(vg), axis=1)
        inv = tl.where(amax > 0, 127.0 / amax, 0.0)
        r = vg * inv[:, None]
        r = (r + 12582912.0) - 12582912.0  # 1.5 * 2^23: rounds to the nearest integer, ties to even
        cols = col0 + tl.arange(0, NG)[:, None] * GROUP_SIZE + tl.arange(0, GROUP_SIZE)[None, :]
        tl.store(codes_ptr + row * K + cols, r.to(tl.int8), mask=cols < K)
        g = col0 // GROUP_SIZE + tl.arange(0, NG)
        gmask = g < K // GROUP_SIZE
        tl.store(scales_ptr + row * (K // GROUP_SIZE) + g, amax / 127.0, mask=gmask)
        tl.store(sums_ptr + row * (K // GROUP_SIZE) + g, tl.sum(vg, axis=1), mask=gmask)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, sum_ptr, K, GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                              PDL: tl.constexpr):
        """x [M, K] -> its int8 rows (store_int8_groups), BLOCK_G groups a program: for an x whose
        producer did not write them."""
        pid_m = tl.program_id(0)
        cols = tl.program_id(1) * (BLOCK_G * GROUP_SIZE) + tl.arange(0, BLOCK_G * GROUP_SIZE)
        pdl.release(PDL)
        pdl.wait(PDL)
        x = tl.load(x_ptr + pid_m * K + cols, mask=cols < K, other=0.0).to(tl.float32)
        store_int8_groups(x, q_ptr, s_ptr, sum_ptr, pid_m, tl.program_id(1) * (BLOCK_G * GROUP_SIZE), K,
                          BLOCK_G * GROUP_SIZE, GROUP_SIZE)

    @triton.jit
    def _qgemv_dp4a_kernel(xq_ptr, xs_ptr, xsum_ptr, q_ptr, s_ptr, o_ptr, b_ptr, y_ptr, M, N, K,
                           BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                           EVEN: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_G: tl.constexpr, LATE_WORDS: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
        """y = x @ W.T with x given as its Int8Rows (codes, scales, sums; store_int8_groups): one
        program per BLOCK_M rows of x and BLOCK_N weight rows, the whole K, no split-K; each weight
        word, loaded once, meets the BLOCK_M rows' activation words.  Per (row, group)
        sum_j w_j x_j = scale * xs * D (- 8 scale * X for Q4_0) (+ offset * X for an offset),
        D = sum_j code_j xq_j in int32 by dp4a: four codes a word, so per weight and row of x a
        quarter of a dp4a (int4: and half a shift-and-mask per weight; an int4 word's low nibbles
        are its group's elements 4i..4i+3, its high nibbles 16 + 4i.., quant.py's layout, so the
        activations' bytes are read in their order).  X: the exact sum of the group's activations.
        Tensors are [rows of x, weight rows, groups, words].
        LATE_WORDS (variant "dp4a_late", for several rows of x): each word's dp4a is scaled as it is and
        the words are summed once after the loop, not per group (where Triton spreads a group's words
        over lanes, that per-group sum is a cross-lane shuffle reduction every iteration)."""
        WORDS: tl.constexpr = GROUP_SIZE * BITS // 32
        XWORDS: tl.constexpr = GROUP_SIZE // 4
        XMASKED: tl.constexpr = (not EVEN) or BLOCK_M > 1  # x rows past M exist only for BLOCK_M > 1
        groups = K // GROUP_SIZE
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        m4 = rm[:, None, None, None]
        xrow = xq_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + m4 * (K // 4)
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_G), dtype=tl.float32)
        WL: tl.constexpr = (4 if BITS == 4 else XWORDS) if LATE_WORDS else 1
        acc_w = tl.zeros((BLOCK_M if LATE_WORDS else 1, BLOCK_N if LATE_WORDS else 1,
                          BLOCK_G if LATE_WORDS else 1, WL), dtype=tl.float32)
        gr = tl.arange(0, BLOCK_G)
        pdl.release(PDL)
        words, s, o = _load_words(q_ptr, s_ptr, o_ptr, rn, gr, nmask, gr < groups, K, WORDS, HAS_OFFSET,
                                  GROUP_SIZE, not EVEN)
        pdl.wait(PDL)
        for g0 in range(0, groups, BLOCK_G):
            g = g0 + gr
            gn = _next_groups(g0, groups, gr, BLOCK_G, EVEN)
            nwords, ns, no = _load_words(q_ptr, s_ptr, o_ptr, rn, gn, nmask, gn < groups, K, WORDS, HAS_OFFSET,
                                         GROUP_SIZE, not EVEN)
            g4 = g[None, None, :, None]
            xm = (rm < M)[:, None, None, None] & (g < groups)[None, None, :, None]
            w4 = words[None, :, :, :]
            if BITS == 4:
                xw = xrow + g4 * XWORDS + tl.arange(0, 4)[None, None, None, :]
                lo, xlo = tl.broadcast(w4 & 0x0F0F0F0F, _load(xw, xm, XMASKED))
                hi, xhi = tl.broadcast((w4 >> 4) & 0x0F0F0F0F, _load(xw + 4, xm, XMASKED))
                d = _dp4a(hi, xhi, _dp4a(lo, xlo, tl.zeros_like(lo), False, ASM), False, ASM)
            else:
                xw = xrow + g4 * XWORDS + tl.arange(0, XWORDS)[None, None, None, :]
                wb, xb = tl.broadcast(w4, _load(xw, xm, XMASKED))
                d = _dp4a(wb, xb, tl.zeros_like(wb), True, ASM)
            if LATE_WORDS:  # |d| < 2^22: to float exactly by the exponent bits of 1.5 * 2^23
                s4 = s[None, :, :, :]
                sx = s4 * _load(xs_ptr + m4 * groups + g4, xm, XMASKED)
                acc_w += ((d + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0) * sx
                part = tl.zeros_like(sx)
            else:
                dot = tl.sum(d, axis=3, keep_dims=True).to(tl.float32)
                s4 = s[None, :, :, :]
                part = s4 * (_load(xs_ptr + m4 * groups + g4, xm, XMASKED) * dot)
            if HAS_OFFSET or BITS == 4:
                xsum = _load(xsum_ptr + m4 * groups + g4, xm, XMASKED)
                if HAS_OFFSET:
                    part += o[None, :, :, :] * xsum
                else:  # Q4_0: w = scale * (code - 8)
                    part -= 8.0 * s4 * xsum
            acc += tl.sum(part, axis=3)
            words, s, o = nwords, ns, no
        out = tl.sum(acc, axis=2)
        if LATE_WORDS:
            out += tl.sum(tl.sum(acc_w, axis=3), axis=2)
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], out.to(y_ptr.dtype.element_ty),
                 mask=(rm < M)[:, None] & nmask[None, :])


# Rows of x per GEMV bucket: a call with M rows uses the smallest bucket >= M; above the last
# bucket (or where a bucket's config is None) the weight is dequantized and cuBLAS multiplies.
M_BUCKETS = (1, 8, 16, 32, 64)
# (BLOCK_M, BLOCK_N, BLOCK_G, WAVES, num_warps, num_stages) per (bits, M bucket); WAVES 0: no split-K.
# BEGIN TUNED (tools/tune_quant.py --apply rewrites this block)
# Measured by tools/tune_quant.py on NVIDIA H100 80GB HBM3, 132 SMs, 2026-11-27 16:09 UTC, torch 2.11.0+cu130, Triton 3.6.0 (best of the grid per bucket,
# summed over 7B layer shapes; None: dequantize + cuBLAS was faster; int4 and int8 at 1 and 8 rows: the fastest whole decode step of the best alone,
# step_rank, BENCHMARKS runs 28d / 28e).
GEMV_CONFIGS = {
    (4, 1): (1, 2, 64, 0, 2, 3, 'dp4a'),
    (4, 8): (16, 64, 4, 2, 4, 3),
    (4, 16): (16, 64, 4, 2, 4, 1),
    (4, 32): (32, 64, 4, 2, 4, 1),
    (4, 64): (64, 64, 4, 2, 4, 1),
    (8, 1): (1, 1, 128, 0, 4, 1, 'dp4a'),
    (8, 8): (8, 8, 16, 0, 2, 1, 'dp4a'),
    (8, 16): (16, 64, 4, 2, 4, 1),
    (8, 32): (32, 64, 4, 2, 4, 1),
    (8, 64): (64, 64, 4, 2, 4, 3),
}
# (bits, bucket, N, K): a shape whose own best beat its bucket's on it by 3%+ (where step_rank ran: shortened the decode step by 0.25%+)
GEMV_SHAPE_CONFIGS = {
    (4, 1, 12288, 4096): (1, 4, 32, 0, 1, 1, 'dp4a'),
    (8, 1, 4096, 11008): (1, 2, 64, 0, 1, 2, 'dp4a'),
}
# END TUNED


# HEXSWARM_INT8_ACTIVATIONS=0: no "dp4a" (whose activations are rounded to int8 per group of 32); these
# keep them as they are (BENCHMARKS run 26's tuned table on the H100: exact up to fp32 summation order)
INT8_ACTIVATIONS_ENV = "HEXSWARM_INT8_ACTIVATIONS"
EXACT_CONFIGS = {(4, 1): (1, 1, 32, 0, 1, 2, "stream"), (8, 1): (1, 1, 32, 0, 1, 2, "stream"),
                 (4, 8): (16, 64, 4, 2, 4, 3), (8, 8): (16, 64, 4, 2, 4, 3), (4, 16): (16, 64, 4, 2, 4, 3),
                 (8, 16): (16, 64, 4, 2, 4, 3)}


def int8_activations() -> bool:
    """Whether the "dp4a" kernel may serve (the default; HEXSWARM_INT8_ACTIVATIONS=0 turns it off)."""
    return os.environ.get(INT8_ACTIVATIONS_ENV, "1").strip() != "0"


def gemv_config(w, rows: int):
    """The GEMV config for `rows` rows of x times QuantLinear w (its shape's own entry where the
    tuner found one, else its bucket's), or None: dequantize and GEMM instead (also for a weight
    of 2^31+ elements: the GEMV's indices are int32, for speed)."""
    if w.qweight.numel() >= 2**31:
        return None
    for b in M_BUCKETS:
        if rows <= b:
            config = GEMV_SHAPE_CONFIGS.get((w.bits, b, w.out_features, w.in_features), GEMV_CONFIGS.get((w.bits, b)))
            if config is not None and variant(config) in DP4A and not int8_activations():
                return EXACT_CONFIGS.get((w.bits, b))
            return config
    return None


def takes_int8_rows(w, rows: int) -> bool:
    """Whether `gemv` over `rows` rows with w runs the "dp4a" variant, so that x's producer may write
    x's Int8Rows for it (else gemv makes them itself, one kernel more)."""
    config = gemv_config(w, rows)
    return config is not None and variant(config) in DP4A and _words(w) is not None


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton's CPU interpreter (the tests): a few "SMs", so that small shapes split K


# the bits of 2^7 (the "fact" kernel's float magic), passed as an argument: a value the compiler
# cannot see, so that mask-and-magic compiles to one LOP3 (two immediates would take two)
MAGIC = (127 + 7) << 23
VARIANTS = ("deq", "fact", "stream", "dp4a", "dp4a_late")  # a config's 7th field; a 6-field config is "deq"
FACTORED = ("fact", "stream")  # variants served by _qgemv_fact_kernel
DP4A = ("dp4a", "dp4a_late")  # variants served by _qgemv_dp4a_kernel (int8 activations)
WORD_VARIANTS = (*FACTORED, *DP4A)  # variants that read the weights as int32 words


def variant(config) -> str:
    """The kernel a config runs: "deq" (_qgemv_kernel: dequantize each weight, round it to x's
    dtype, multiply) or "fact" (_qgemv_fact_kernel, M = 1 only: scales factored out of the loop)."""
    return config[6] if len(config) > 6 else "deq"


def _words(w):
    """w's packed codes viewed as int32 words [N, K * bits / 32], or None where the storage does
    not allow it (not contiguous or not 4-byte aligned): the "fact" kernel reads whole words."""
    q = w.qweight
    if not q.is_contiguous() or (q.storage_offset() * q.element_size()) % 4 or q.data_ptr() % 16:
        return None
    return q.view(torch.int32)


def gemv(x: torch.Tensor, w, bias: torch.Tensor | None, config=None, round_w: bool = True,
         xq: Int8Rows | None = None) -> torch.Tensor:
    """x [..., K] @ dequant(w).T (+ bias) -> [..., N] in x's dtype.  `config` overrides the
    table (tools/tune_quant.py); its 7th field picks the kernel (`variant`; a "fact" config with
    BLOCK_M > 1, for x not bf16 / fp16 or for storage it cannot read as words runs "deq" with its
    tile: the same result within the tolerances).
    round_w=False skips rounding w to x's dtype on the "deq" M = 1 path (measured by the tuner
    only, not served: it would break that kernel's numerics contract).
    xq: x's Int8Rows when its producer wrote them (used by the "dp4a" variant, else ignored)."""
    K, N = w.in_features, w.out_features
    x2 = x.reshape(-1, K)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    M = x2.shape[0]
    config = config or gemv_config(w, M)
    block_m, block_n, block_g, waves, warps, stages = config[:6]
    fact = ((block_m == 1 or variant(config) in DP4A) and variant(config) in WORD_VARIANTS
            and x.dtype in (torch.bfloat16, torch.float16))
    words = _words(w) if fact and x2.data_ptr() % 16 == 0 else None
    even = N % block_n == 0 and (K // GROUP) % block_g == 0  # no partial tile: the kernels' unmasked path
    if words is None and variant(config) in DP4A:
        block_m = 1  # the "deq" kernel's M = 1 path with the tile (its tl.dot path wants 16+ rows)
    elif words is not None and variant(config) in DP4A:
        return _gemv_dp4a(x2, xq, words, w, bias, block_m, block_n, block_g, warps, stages, even,
                          variant(config) == "dp4a_late").view(*x.shape[:-1], N)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    steps = triton.cdiv(K // GROUP, block_g)
    per_split = triton.cdiv(steps, min(steps, max(1, triton.cdiv(waves * _sm_count(x.device), tiles))))
    splits = triton.cdiv(steps, per_split)  # no program without groups
    partial = splits > 1
    y = torch.empty((splits, M, N) if partial else (M, N), dtype=torch.float32 if partial else x.dtype, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), splits)
    offset = w.offset if w.offset is not None else w.scale
    common = dict(BITS=w.bits, HAS_OFFSET=w.offset is not None, HAS_BIAS=bias is not None, PARTIAL=partial, EVEN=even,
                  GROUP_SIZE=GROUP, BLOCK_N=block_n, BLOCK_G=block_g, num_warps=warps, num_stages=stages)
    if words is not None:
        _qgemv_fact_kernel[grid](x2, words, w.scale, offset, bias if bias is not None else x2, y, N, K,
                                 per_split * block_g, MAGIC, LATE_SUM=variant(config) == "stream",
                                 **pdl.launch_kwargs(x.device), **common)
    else:
        _qgemv_kernel[grid](x2, w.qweight, w.scale, offset, bias if bias is not None else x2, y, M, N, K,
                            per_split * block_g, ROUND_W=round_w, BLOCK_M=block_m, **common)
    if partial:  # the splits' partial sums added in split order (deterministic, unlike atomics)
        y = y.sum(0).to(x.dtype)
    return y.view(*x.shape[:-1], N)


class Int8Rows(NamedTuple):
    """Activations [M, K] as the "dp4a" GEMV reads them (store_int8_groups): int8 codes [M, K], fp32
    scales and sums [M, K / 32]."""

    codes: torch.Tensor
    scales: torch.Tensor
    sums: torch.Tensor

    @classmethod
    def empty(cls, rows: int, k: int, device) -> "Int8Rows":
        scales = torch.empty(rows, k // GROUP, dtype=torch.float32, device=device)
        return cls(torch.empty(rows, k, dtype=torch.int8, device=device), scales, torch.empty_like(scales))


def quantize_rows(x: torch.Tensor, out: Int8Rows | None = None) -> Int8Rows:
    """Contiguous x [M, K] -> its Int8Rows (one kernel; quant.quantize_activations is the reference)."""
    M, K = x.shape
    out = out if out is not None else Int8Rows.empty(M, K, x.device)
    block_g = min(32, triton.next_power_of_2(K // GROUP))
    _quantize_rows_kernel[(M, triton.cdiv(K // GROUP, block_g))](x, *out, K, GROUP_SIZE=GROUP, BLOCK_G=block_g,
                                                                num_warps=4, **pdl.launch_kwargs(x.device))
    return out


def _gemv_dp4a(x2, xq: Int8Rows | None, words, w, bias, block_m, block_n, block_g, warps, stages, even: bool,
               late_words: bool = False) -> torch.Tensor:
    """The "dp4a" variants: x's int8 rows (xq, written by x's producer, or made here: one small
    kernel), then the GEMV ("dp4a_late": LATE_WORDS)."""
    M, K = x2.shape
    N = w.out_features
    xq, xs, xsum = xq if xq is not None else quantize_rows(x2)
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    offset = w.offset if w.offset is not None else w.scale
    _qgemv_dp4a_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        xq, xs, xsum, words, w.scale, offset, bias if bias is not None else x2, y, M, N, K, BITS=w.bits,
        HAS_OFFSET=w.offset is not None, HAS_BIAS=bias is not None, EVEN=even, GROUP_SIZE=GROUP, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_G=block_g, LATE_WORDS=late_words, ASM=x2.is_cuda and torch.version.hip is None,
        num_warps=warps, num_stages=stages, **pdl.launch_kwargs(x2.device))
    return y


def dequantize(w, dtype: torch.dtype) -> torch.Tensor:
    """The dense [N, K] weight in `dtype` (for GEMMs over many rows)."""
    N, K = w.out_features, w.in_features
    out = torch.empty(N, K, dtype=dtype, device=w.qweight.device)
    block_n, block_g = 32, 8
    offset = w.offset if w.offset is not None else w.scale
    _dequant_kernel[(triton.cdiv(N, block_n), triton.cdiv(K // GROUP, block_g))](
        w.qweight, w.scale, offset, out, N, K, BITS=w.bits, HAS_OFFSET=w.offset is not None, GROUP_SIZE=GROUP,
        BLOCK_N=block_n, BLOCK_G=block_g, num_warps=4)
    return out


def disable(error: Exception) -> None:
    """Turn the kernels off for this process (QuantLinear then dequantizes in torch), once, loudly.
    Compilation happens on a step's first call, before any CUDA graph capture."""
    global AVAILABLE, FAILURE
    AVAILABLE = False
    FAILURE = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    log.warning("quantized Triton kernels failed (%s); dequantizing in torch instead (slower)", FAILURE)

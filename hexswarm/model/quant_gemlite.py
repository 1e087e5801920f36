"""Optional GPU backend for `QuantLinear`: gemlite's Triton low-bit kernels (mobiusml/gemlite,
Apache-2.0), selected with HEXSWARM_QUANT_BACKEND=gemlite (quant.backend()); our own kernels
(quant_kernels.py) stay the default.

Our format (quant.py: groups of 32 along K; int8 w = d*q, Q4_1 w = d*q + m, Q4_0 w = d*(q - 8))
is converted once at load into the tensors gemlite's kernels read (its checkpoint schema, the
layout `GemLiteLinear.pack()` produces), in plain torch so that CPU tests check it without gemlite:

* int8: W_q = qweight.t(), a [K, N] view of our [N, K] bytes (no copy; pack() keeps int8 so);
  W_group_mode 2 (w = q * scale).
* int4: W_q int32 [K/8, N], contiguous; element k of column n at bits 4*(k % 8) of word k // 8
  (gemlite's pack_weights_over_cols, then transposed); Q4_1: W_group_mode 4, w = fma(q, scale,
  zero) with zero = our offset as it is (pack() would compute zero = -z*scale from an HQQ zero
  point, rounding it); Q4_0: W_group_mode 3 with the scalar zero point 8, w = (q - 8) * scale.
* scales (and Q4_1 zeros) fp16 [K/32, N]: the bytes of ours, transposed (N-contiguous loads),
  in buffers with a few zero rows after them (_padded: GEMM_SPLITK reads past the end).

So the bytes per weight are ours (Q4_0: + one int32).  Numerics: gemlite dequantizes in fp16 (the
scales' dtype: 11-bit mantissas, finer than bf16's rounding of the weight in our reference) and
accumulates in fp32; split-K partial sums go through fp32 atomics (set_native_atomic_bfp16(False):
bf16 atomics would round ~K/32 partial sums to 8 bits each).

Which kernel: gemlite's own choice by rows (int4: GEMV_REVSPLITK up to 4 rows, int8: GEMV_SPLITK
at 1-2 rows, GEMM_SPLITK up to 63), unless M1_KERNEL names one for batch-1 decode; above MAX_ROWS
(prefill) the weight is dequantized here and cuBLAS multiplies (gemlite's GEMM would autotune for
every new row count).  Configs: the JSON named by HEXSWARM_GEMLITE_CONFIG, else
hexswarm/model/gemlite_configs/<gpu>.json when it exists (tools/bench_gemlite.py writes one);
a shape missing there is autotuned on its first call (a warm-up, before CUDA graph capture) over
the short CANDIDATES lists below, not gemlite's 12-22 configs per kernel.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hexswarm.model.quant_format import GROUP

log = logging.getLogger("hexswarm.quant")

CONFIG_ENV = "HEXSWARM_GEMLITE_CONFIG"
CONFIG_DIR = Path(__file__).resolve().parent / "gemlite_configs"
MAX_ROWS = 64  # gemlite kernels up to this many rows of x; above, dequantize + cuBLAS (as our backend)
# batch-1 kernel per bits, overriding gemlite's choice (None: gemlite's); tools/bench_gemlite.py
# times each and --m1-kernel serves one
M1_KERNEL: dict[int, str | None] = {8: None, 4: None}
FAILURE: str | None = None  # why gemlite was turned off in this process, if it was

# gemlite's DType values (gemlite/dtypes.py) and W_group_mode values (core.py pack())
_DTYPE = {torch.float16: 1, torch.bfloat16: 2}
_FP32, _FP16 = 0, 1
MODE_SCALE, MODE_SHIFT_SCALE, MODE_FMA = 2, 3, 4


# ---- the format (plain torch) ----------------------------------------------------------------
def convert(q) -> dict:
    """A QuantLinear's tensors as gemlite reads them (on q's device): W_q, scales, zeros (their
    first K/32 rows; zero rows follow) and the settings (bits, group_mode, contiguous); see the
    module doc."""
    n, k = q.out_features, q.in_features
    scales = _padded(q.scale.t())
    if q.bits == 8:
        no_zeros = torch.zeros(1, 0, dtype=torch.int32, device=q.qweight.device)  # pack()'s placeholder
        return dict(W_q=q.qweight.t(), scales=scales, zeros=no_zeros, bits=8, group_mode=MODE_SCALE, contiguous=False)
    if n * k // GROUP == 1:
        raise ValueError("gemlite takes a one-element zeros tensor for a scalar zero point")
    from hexswarm.model.quant import unpack_int4

    codes = unpack_int4(q.qweight).view(n, k // 2, 2)  # consecutive pairs: one byte each
    words = (codes[..., 0] | (codes[..., 1] << 4)).view(torch.int32)  # little-endian: element 8w + i at bits 4i
    if q.offset is None:  # Q4_0
        zeros, mode = torch.tensor(8, dtype=torch.int32, device=q.qweight.device), MODE_SHIFT_SCALE
    else:
        zeros, mode = _padded(q.offset.t()), MODE_FMA
    return dict(W_q=words.t().contiguous(), scales=scales, zeros=zeros, bits=4, group_mode=mode, contiguous=True)


def _padded(t: torch.Tensor) -> torch.Tensor:
    """[G, N] per-group tensor -> a [G + pad, N] copy whose extra rows are zeros.

    GEMM_SPLITK loads scales and zeros without a mask: when K is not a multiple of its
    SPLIT_K * BLOCK_SIZE_K, the last split reads up to SPLIT_K * BLOCK_SIZE_K / 32 - 1 rows past
    the end (and, for N not a multiple of BLOCK_SIZE_N, a row's tail runs into the next row).
    Its weights there are masked to 0, but 0 * a NaN or Inf read from a neighbouring tensor is
    NaN; zero rows make those products 0.  (-G) % 16 + 1 rows cover SPLIT_K * BLOCK_SIZE_K up to
    512 (gemlite's lists go to 16 x 32 at groups of 32)."""
    g, n = t.shape
    out = torch.zeros(g + (-g) % 16 + 1, n, dtype=t.dtype, device=t.device)
    out[:g] = t
    return out


def unpack_codes(w_q: torch.Tensor, bits: int) -> torch.Tensor:
    """gemlite's W_q -> the codes [K, N] (int32): int8 as they are, int4 unpacked from the words."""
    if bits == 8:
        return w_q.to(torch.int32)
    kw, n = w_q.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=w_q.device).view(1, 8, 1)
    return ((w_q.unsqueeze(1) >> shifts) & 0xF).view(kw * 8, n)


def dequantize(t: dict, dtype: torch.dtype = torch.float32, k0: int = 0, k1: int | None = None) -> torch.Tensor:
    """Columns k0:k1 (whole groups) of the dense [N, K] weight from gemlite's tensors, computed in
    float32 as quant.QuantLinear.dequantize computes it from ours (equal bit for bit)."""
    bits, w_q = t["bits"], t["W_q"]
    per_row = 8 if bits == 4 else 1
    k1 = w_q.shape[0] * per_row if k1 is None else k1
    g0, g1 = k0 // GROUP, k1 // GROUP
    q = unpack_codes(w_q[k0 // per_row:k1 // per_row], bits).float().reshape(g1 - g0, GROUP, -1)
    if t["group_mode"] == MODE_SHIFT_SCALE:
        q = q - t["zeros"].float()
    w = q * t["scales"][g0:g1].float()[:, None, :]
    if t["group_mode"] == MODE_FMA:
        w = w + t["zeros"][g0:g1].float()[:, None, :]
    return w.reshape(k1 - k0, -1).t().to(dtype)


# ---- gemlite itself (CUDA) ---------------------------------------------------------------------
# Autotune candidates per gemlite kernel (its config dicts; its pruner then fits BLOCK_SIZE_K to
# the group of 32 and drops what does not fit): the configs that won most often in gemlite's own
# H100 table (configs/h100.json, 4-bit, groups of 64/128) for GEMV_REVSPLITK at M = 1 and
# GEMM_SPLITK at M = 32, and four of its "fast" GEMV_SPLITK list.  Stage-1 GEMM_SPLITK configs
# are dropped by its pruner for int8 (e = 1), hence the stage-2 ones.
def _rev(n, k, warps, stages, order=0):
    return dict(BLOCK_SIZE_M=1, BLOCK_SIZE_N=n, BLOCK_SIZE_K=k, A_load_order=order, dot_prod_mode=0), warps, stages


def _splitk_gemv(n, warps, stages, order=0):
    return dict(BLOCK_SIZE_M=1, BLOCK_SIZE_N=n, BLOCK_SIZE_K=GROUP, GROUP_SIZE_M=8, SPLIT_K=1, A_load_order=order,
                dot_prod_mode=0), warps, stages


def _splitk_gemm(n, split, order, warps, stages):
    return dict(BLOCK_SIZE_M=32, BLOCK_SIZE_N=n, BLOCK_SIZE_K=GROUP, GROUP_SIZE_M=8, SPLIT_K=split,
                A_load_order=order), warps, stages


CANDIDATES = {
    "GEMV_REVSPLITK": [_rev(256, 8, 2, 1), _rev(512, 8, 4, 1), _rev(128, 8, 1, 1), _rev(256, 16, 2, 1),
                       _rev(256, 8, 2, 2, 1)],
    "GEMV_SPLITK": [_splitk_gemv(16, 4, 2), _splitk_gemv(4, 8, 2), _splitk_gemv(8, 4, 2), _splitk_gemv(4, 4, 1, 1)],
    "GEMM_SPLITK": [_splitk_gemm(64, 8, 2, 4, 1), _splitk_gemm(64, 8, 2, 4, 2), _splitk_gemm(32, 8, 2, 4, 1),
                    _splitk_gemm(128, 8, 0, 4, 2), _splitk_gemm(512, 4, 0, 4, 1)],
}
_gemlite = None  # the module once set up; False: unavailable


def gpu_tag(device: torch.device | None = None) -> str:
    """The config file name for this GPU: "h100", "h200", ... (the device name's model)."""
    name = torch.cuda.get_device_properties(device or 0).name.lower()
    for tag in ("h200", "h100", "h800", "h20", "a100", "l40s", "l40", "l4"):
        if tag in name:
            return tag
    return name.replace(" ", "_")


def config_path() -> Path | None:
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    path = CONFIG_DIR / f"{gpu_tag()}.json"
    return path if path.exists() else None


def restrict_candidates(names=None) -> None:
    """Autotune over CANDIDATES instead of gemlite's lists (bounded first-call time).  gemlite's
    kernels are triton.autotune objects; each keeps its list in `.configs`."""
    import triton

    from gemlite.core import GEMLITE_TRITON_MAPPING

    for name in names or CANDIDATES:
        configs = [triton.Config(dict(kw), num_warps=w, num_stages=s) for kw, w, s in CANDIDATES[name]]
        for kernel in GEMLITE_TRITON_MAPPING[name].kernel:
            kernel.configs = configs  # >= 2: with one, Triton skips gemlite's pruner (which fits BLOCK_SIZE_K)


def load():
    """gemlite, set up for our format (fp32 atomics, candidates, configs); None when it cannot be
    used here (not installed, no CUDA device, or turned off by a failure)."""
    global _gemlite, FAILURE
    if _gemlite is None:
        try:
            import gemlite  # imports need a CUDA device (it reads the device's properties)

            gemlite.set_native_atomic_bfp16(False)
            restrict_candidates()
            path = config_path()
            if path is not None and not gemlite.load_config(str(path)):
                log.warning("gemlite: could not load configs from %s; autotuning on first use", path)
            _gemlite = gemlite
        except Exception as e:
            _gemlite = False
            FAILURE = f"{type(e).__name__}: {_first_line(e)}"
            log.warning("gemlite backend unavailable (%s); using hexswarm's kernels", FAILURE)
    return _gemlite or None


def disable(error: Exception) -> None:
    """Turn gemlite off for this process (dequantize + cuBLAS instead), once, loudly."""
    global _gemlite, FAILURE
    _gemlite = False
    FAILURE = f"{type(error).__name__}: {_first_line(error)}"
    log.warning("gemlite kernels failed (%s); dequantizing in torch instead (slower)", FAILURE)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def matmul_index(kernel: str) -> int:
    from gemlite.core import GEMLITE_MATMUL_TYPES_MAPPING

    return GEMLITE_MATMUL_TYPES_MAPPING[kernel]


class GemliteWeight(nn.Module):
    """A QuantLinear's weight in gemlite's layout (built by `convert`), and the call into gemlite."""

    def __init__(self, t: dict, in_features: int, out_features: int):
        super().__init__()
        self.bits, self.group_mode, self.contiguous = t["bits"], t["group_mode"], t["contiguous"]
        self.in_features, self.out_features = in_features, out_features
        self.groups = in_features // GROUP
        self.register_buffer("W_q", t["W_q"])
        self.register_buffer("scales_padded", t["scales"])  # [groups + pad, N]: see _padded
        self.register_buffer("zeros_padded", t["zeros"])  # the same, or gemlite's scalar / empty zeros
        self._meta: dict = {}
        self.register_buffer("meta_scale", torch.zeros((), dtype=torch.float32, device=t["W_q"].device),
                             persistent=False)

    @property
    def scales(self) -> torch.Tensor:
        return self.scales_padded[:self.groups]

    @property
    def zeros(self) -> torch.Tensor:
        z = self.zeros_padded
        return z[:self.groups] if self.group_mode == MODE_FMA else z

    def tensors(self) -> dict:
        return dict(W_q=self.W_q, scales=self.scales, zeros=self.zeros, bits=self.bits, group_mode=self.group_mode,
                    contiguous=self.contiguous)

    @property
    def nbytes(self) -> int:
        """Bytes a call reads (the padding rows are not read but for ragged splits)."""
        return sum(t.numel() * t.element_size() for t in (self.W_q, self.scales, self.zeros))

    def meta_args(self, dtype: torch.dtype) -> list[int]:
        """gemlite's meta-data list (GemLiteLinear.get_meta_args order) for activations of `dtype`."""
        if dtype not in self._meta:
            self._meta[dtype] = [0, self.bits, GROUP, (1 << self.bits) - 1, 32 // self.bits if self.bits == 4 else 1,
                                 _DTYPE[dtype], _DTYPE[dtype], _FP32, _FP16, 0, self.group_mode, int(self.contiguous)]
        return self._meta[dtype]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [N, K] weight, built a slice of K at a time (bounded scratch memory)."""
        K = self.in_features
        out = torch.empty(self.out_features, K, dtype=dtype, device=self.W_q.device)
        step = 64 * GROUP
        for k0 in range(0, K, step):
            out[:, k0:k0 + step] = dequantize(self.tensors(), dtype, k0, min(K, k0 + step))
        return out

    def run(self, gemlite, x: torch.Tensor, bias: torch.Tensor | None = None, kernel: str | None = None):
        """x @ W.T (+ bias) by gemlite's `kernel` (GEMV, GEMV_REVSPLITK, GEMV_SPLITK, GEMM_SPLITK,
        GEMM; None: gemlite's choice by rows), in x's dtype (fp16 or bf16)."""
        return gemlite.forward_functional(x, bias, [self.W_q, self.scales, self.zeros, self.meta_scale],
                                          self.meta_args(x.dtype), matmul_index(kernel) if kernel else -1)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.is_cuda and x.dtype in _DTYPE and rows <= MAX_ROWS:
            gemlite = load()
            if gemlite is not None:
                try:
                    return self.run(gemlite, x, bias, M1_KERNEL.get(self.bits) if rows == 1 else None)
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as e:  # a Triton build that cannot compile them: serve slower, not fail
                    disable(e)
        return F.linear(x, self.dequantize(x.dtype), bias)

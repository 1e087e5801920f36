"""Weight-only quantized linear layers: int8 and int4 with per-group scales along the input dim.

One format family, converted once at load, serves both GGUF files and `--quantize`:

* int8: `qweight` int8 [N, K], `scale` fp16 [N, K/32]; w = scale * q.  This *is* GGUF Q8_0
  (a block = one fp16 scale + 32 int8), so a Q8_0 tensor is taken over without loss.
* int4: `qweight` uint8 [N, K/2], `scale` fp16 [N, K/32] and, when asymmetric, `offset` fp16
  [N, K/32]: w = scale * q + offset (GGUF Q4_1, and `--quantize int4`), else w = scale * (q - 8)
  (GGUF Q4_0); q in [0, 15].  Byte j of a group of 32 holds element j (low nibble) and element
  j + 16 (high nibble): GGUF's layout, so Q4_0 / Q4_1 blocks are copied as they are and
  dequantize bit for bit as llama.cpp's (even the sign of zero).

`QuantLinear.__call__(x, bias)` is the one linear op the layers call (`linear()` below picks
it or `F.linear` for a dense weight).  On CUDA with Triton it runs the fused dequantize-GEMV
kernel for decode-sized batches (quant_kernels.gemv_config: up to 64 rows, tuned per batch
bucket) and dequantize-then-GEMM above (prefill);
elsewhere it dequantizes in torch (the reference every kernel is checked against).
With HEXSWARM_QUANT_BACKEND=gemlite (`backend()`), a CUDA QuantLinear is converted once at load
into gemlite's layout and served by gemlite's kernels instead (model/quant_gemlite.py).  With
HEXSWARM_QUANT_BACKEND=tinygemm an int4 one also gets torch's tinygemm layout, which serves steps
of up to quant_tinygemm.MAX_ROWS rows (model/quant_tinygemm.py: faster at batch 1, more memory).
See docs/DECISIONS.md for why this format.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from hexswarm.errors import UserError

from hexswarm.model.quant_format import GGUF_KEPT_TYPES, GROUP, QUANT_MODES

BACKEND_ENV = "HEXSWARM_QUANT_BACKEND"
BACKENDS = ("hexswarm", "gemlite", "tinygemm")


def backend() -> str:
    """The GPU kernels that serve quantized weights: "hexswarm" (quant_kernels.py, the default),
    "gemlite" (quant_gemlite.py; needs the gemlite package, else hexswarm's serve) or "tinygemm"
    (quant_tinygemm.py: torch's int4 kernel for steps of a few rows, ours for the rest)."""
    name = os.environ.get(BACKEND_ENV, "").strip().lower() or "hexswarm"
    if name not in BACKENDS:
        raise UserError(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


class QuantLinear(nn.Module):
    """A [N, K] weight held quantized; `bits` 8 or 4, groups of 32 along K."""

    def __init__(self, bits: int, qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None):
        super().__init__()
        if bits not in (8, 4):
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        self.bits = bits
        self.out_features = qweight.shape[0]
        self.in_features = scale.shape[1] * GROUP
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.gemlite = None  # a quant_gemlite.GemliteWeight once converted (to_gemlite): ours are then None
        self.tinygemm = None  # a quant_tinygemm.TinygemmWeight beside ours (to_tinygemm): steps of few rows

    @property
    def kind(self) -> str:
        return f"int{self.bits}"

    @property
    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.offset) if t is not None)
        return own + sum(extra.nbytes for extra in (self.gemlite, self.tinygemm) if extra is not None)

    def extra_repr(self) -> str:
        layout = ", gemlite" if self.gemlite is not None else ", +tinygemm" if self.tinygemm is not None else ""
        return f"{self.kind}, out={self.out_features}, in={self.in_features}, group={GROUP}{layout}"

    # ---- reference (torch) ----------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [N, K] weight, computed in float32 as llama.cpp's dequantizers do."""
        if self.gemlite is not None:
            return self.gemlite.dequantize(dtype)
        N, K = self.out_features, self.in_features
        q = unpack_int4(self.qweight) if self.bits == 4 else self.qweight
        q = q.view(N, K // GROUP, GROUP).float()
        if self.bits == 4 and self.offset is None:
            q = q - 8.0
        w = q * self.scale.float()[..., None]
        if self.offset is not None:
            w = w + self.offset.float()[..., None]
        return w.view(N, K).to(dtype)

    def route(self, rows: int, dtype: torch.dtype) -> str:
        """The path `forward` takes for `rows` rows of x in `dtype` (x on this weight's device):
        "gemlite", "tinygemm", "triton" (quant_kernels: its GEMV, or dequantize + cuBLAS where its
        table names none) or "torch" (dequantize in torch: the CPU, or kernels turned off).  One
        decision, also asked by int8_rows_for."""
        if self.gemlite is not None:
            return "gemlite"
        if self.tinygemm is not None and self.tinygemm.takes(rows, dtype):
            return "tinygemm"
        if self.qweight.is_cuda and dtype in (torch.bfloat16, torch.float16):
            from hexswarm.model import quant_kernels

            if quant_kernels.AVAILABLE:
                return "triton"
        return "torch"

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, xq=None) -> torch.Tensor:
        """x @ W.T (+ bias); xq: x's quant_kernels.Int8Rows when its producer wrote them
        (int8_rows_for), used where the "dp4a" GEMV serves this step."""
        rows = x.numel() // self.in_features
        route = self.route(rows, x.dtype)
        if route == "gemlite":
            return self.gemlite(x, bias)
        if route == "tinygemm":
            return self.tinygemm(x, bias)
        if route == "triton":
            from hexswarm.model import quant_kernels

            config = quant_kernels.gemv_config(self, rows)
            try:
                if config is not None:
                    return quant_kernels.gemv(x, self, bias, config, xq=xq)
                return F.linear(x, quant_kernels.dequantize(self, x.dtype), bias)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # a Triton build that cannot compile them: serve slower, not fail
                quant_kernels.disable(e)
        return F.linear(x, self.dequantize(x.dtype), bias)

    # ---- backends ---------------------------------------------------------------------------
    def to_gemlite(self) -> "QuantLinear":
        """Hold the weight in gemlite's layout instead of ours (once, at load; int8 shares our
        bytes, int4 is repacked) and serve it with gemlite's kernels."""
        if self.gemlite is None:
            from hexswarm.model.quant_gemlite import GemliteWeight, convert

            self.gemlite = GemliteWeight(convert(self), self.in_features, self.out_features)
            self.qweight = self.scale = self.offset = None
        return self

    def to_tinygemm(self) -> "QuantLinear":
        """Add torch's tinygemm layout of this int4 weight (once, at load), for steps of few rows."""
        if self.tinygemm is None:
            from hexswarm.model.quant_tinygemm import convert

            self.tinygemm = convert(self)
        return self

    def for_backend(self) -> "QuantLinear":
        """This weight as `backend()` serves it: converted to gemlite's layout when that backend is
        chosen, the weight is on a CUDA device and gemlite loads there; with tinygemm's layout
        added when that one is chosen and takes this weight on this device; else as it is."""
        if self.tinygemm is None and self.qweight.is_cuda and backend() == "tinygemm":
            from hexswarm.model import quant_tinygemm

            if quant_tinygemm.fits(self) and quant_tinygemm.available(self.qweight.device):
                return self.to_tinygemm()
        if self.gemlite is None and self.qweight.is_cuda and backend() == "gemlite":
            from hexswarm.model import quant_gemlite

            # one group in all (N = 1, K = 32) would read as gemlite's scalar zero point: keep ours
            if quant_gemlite.load() is not None and self.out_features * self.in_features > GROUP:
                return self.to_gemlite()
        return self

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_gguf_blocks(cls, raw: torch.Tensor, kind: str, k: int) -> "QuantLinear":
        """Rows of GGUF blocks (uint8 [N, K/32 * block bytes]) of type Q8_0, Q4_0 or Q4_1."""
        if kind not in GGUF_KEPT_TYPES:
            raise UserError(f"GGUF type {kind} is not kept quantized (only {', '.join(GGUF_KEPT_TYPES)})")
        n, groups = raw.shape[0], k // GROUP
        blocks = raw.reshape(n, groups, -1)
        scale = blocks[..., 0:2].contiguous().view(torch.float16).reshape(n, groups)
        if kind == "Q8_0":
            return cls(8, blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k), scale, None)
        if kind == "Q4_1":  # w = d * q + m
            offset = blocks[..., 2:4].contiguous().view(torch.float16).reshape(n, groups)
            packed = blocks[..., 4:]
        else:  # Q4_0: w = d * (q - 8)
            offset = None
            packed = blocks[..., 2:]
        return cls(4, packed.contiguous().reshape(n, k // 2), scale, offset)

    @staticmethod
    def cat(parts: list["QuantLinear"]) -> "QuantLinear | None":
        """Row-wise concatenation (fused QKV / gate-up); None when the formats differ."""
        if len(parts) == 1:
            return parts[0]
        if any(p.gemlite is not None or p.tinygemm is not None for p in parts):
            raise ValueError("concatenate QuantLinears before converting them to another layout")
        if len({(p.bits, p.in_features, p.offset is None) for p in parts}) != 1:
            return None
        offset = None if parts[0].offset is None else torch.cat([p.offset for p in parts])
        return QuantLinear(parts[0].bits, torch.cat([p.qweight for p in parts]), torch.cat([p.scale for p in parts]),
                           offset)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] in the group layout above -> uint8 [N, K] values 0..15."""
    n = packed.shape[0]
    g = packed.view(n, -1, GROUP // 2)
    return torch.cat([g & 0x0F, g >> 4], dim=-1).view(n, -1)


def quantize(weight: torch.Tensor, mode: str) -> QuantLinear:
    """Quantize a dense [N, K] weight (K a multiple of 32) as llama.cpp quantizes Q8_0 / Q4_1."""
    if mode not in QUANT_MODES:
        raise UserError(f"quantize must be one of {', '.join(QUANT_MODES)}, got {mode!r}")
    n, k = weight.shape
    if k % GROUP:
        raise UserError(f"cannot quantize a weight with {k} input features (not a multiple of {GROUP})")
    w = weight.detach().float().view(n, k // GROUP, GROUP)
    if mode == "int8":
        amax = w.abs().amax(-1)
        scale = (amax / 127.0).half()
        inv = torch.where(scale > 0, 1.0 / scale.float(), torch.zeros_like(amax))
        q = torch.round(w * inv[..., None]).clamp(-127, 127).to(torch.int8)
        return QuantLinear(8, q.view(n, k), scale, None)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15.0).half()
    offset = lo.half()
    inv = torch.where(scale > 0, 1.0 / scale.float(), torch.zeros_like(lo))
    q = torch.round((w - offset.float()[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    packed = q[..., : GROUP // 2] | (q[..., GROUP // 2:] << 4)
    return QuantLinear(4, packed.reshape(n, k // 2).contiguous(), scale, offset)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 codes, fp32 scales, fp32 sums) per group of 32 along K, as the "dp4a"
    GEMV takes activations (llama.cpp's Q8_1): scale = amax / 127, code = round(x * 127 / amax)
    (ties to even), sum = the group's exact sum.  The reference of quant_kernels.quantize_rows."""
    m, k = x.shape
    v = x.float().view(m, k // GROUP, GROUP)
    amax = v.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(v * inv[..., None]).to(torch.int8)
    return q.view(m, k), amax / 127.0, v.sum(-1)


def int8_rows_for(weight, rows: int, x_dtype: torch.dtype):
    """Empty quant_kernels.Int8Rows for the input of `linear(x, weight)` over `rows` rows of x, where
    the "dp4a" GEMV will serve it, for x's producer kernel to fill (layers.add_rmsnorm, silu_mul,
    attention.decode_attention); else None (a dense weight, another backend, another kernel)."""
    if not isinstance(weight, QuantLinear) or weight.route(rows, x_dtype) != "triton":
        return None
    from hexswarm.model import quant_kernels

    if not quant_kernels.takes_int8_rows(weight, rows):
        return None
    return quant_kernels.Int8Rows.empty(rows, weight.in_features, weight.qweight.device)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None, xq=None) -> torch.Tensor:
    """F.linear for a dense weight or a QuantLinear: the one linear op of the layers.  xq: see
    int8_rows_for."""
    if isinstance(weight, QuantLinear):
        return weight(x, bias, xq)
    return F.linear(x, weight, bias)

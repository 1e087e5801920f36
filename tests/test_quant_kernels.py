"""The quantized Triton kernels (model/quant_kernels.py) on CPU through Triton's interpreter:
GEMV on both reduction paths of the "deq" kernel (FMA at M = 1, tl.dot above) and the "fact"
kernel (scales factored out of the loop; one program per row, so M = 3 too) and its "stream" tiles (groups
summed after the loop), with and without
split-K, bias, ragged N / K / M tails, int8, int4 with offset (Q4_1) and without (Q4_0), fp16
and (fact) bf16 activations; the dequantize kernel bit for bit against quant.py's reference; the
int8-activation ("dp4a") kernel against the same integer arithmetic in float64, the activations'
quantization against its torch reference, and the producer kernels that write it.  CI has no GPU; the GPU run is
tools/tune_quant.py, which checks every config it times the same way."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from triton_child import run_check

# (BLOCK_M, BLOCK_N, BLOCK_G, WAVES, num_warps, num_stages): both paths, split-K off (WAVES 0)
# and on (the interpreter counts 4 "SMs": WAVES 3 / 2 split these small grids 4 ways)
CONFIGS = [(1, 16, 4, 0, 4, 1), (1, 32, 2, 3, 4, 1), (16, 16, 4, 0, 4, 1), (16, 32, 2, 2, 4, 1)]
# the "fact" kernel: no split-K (a partial row block and a partial group block when ragged), split-K
FACT = [(1, 16, 4, 0, 1, 1, "fact"), (1, 32, 2, 3, 2, 1, "fact")]  # the second at M = 1 only
# the same kernel summing across groups after the loop ("stream": few rows, many groups)
STREAM = [(1, 2, 4, 0, 1, 1, "stream"), (1, 4, 8, 3, 2, 1, "stream")]
# the int8-activation kernel ("dp4a"; no asm in the interpreter: the same sums in integer ops): one x row
# per program and rows of x sharing each weight load (BLOCK_M 4: a partial block at M = 3)
# and "dp4a_late" (each word's dp4a scaled, the words summed after the loop)
DP4A = [(1, 1, 4, 0, 1, 1, "dp4a"), (1, 4, 8, 0, 1, 1, "dp4a"), (4, 2, 4, 0, 1, 1, "dp4a"), (2, 4, 8, 0, 2, 1, "dp4a"),
        (4, 2, 4, 0, 1, 1, "dp4a_late"), (1, 4, 8, 0, 1, 1, "dp4a_late")]
# (N, K): ragged (a partial row block; 7 groups, a partial group block for BLOCK_G 2 and 4: the
# masked path) and even (the unmasked EVEN path, its prefetch clamped to the last block)
SHAPES = [(40, 32 * 7), (32, 32 * 8)]


def _check() -> dict:
    """Runs in a child process with TRITON_INTERPRET=1 (set before triton is imported)."""
    import torch.nn.functional as F

    from hexswarm.model import quant_kernels

    torch.manual_seed(0)
    out = {"gemv": {}, "dequant": {}, "bf16": {}, "dp4a": {}, "rows": _int8_rows_check()}
    for (N, K), name, q in _weights():
        bias = torch.randn(N).to(torch.float16)
        ref_w = q.dequantize(torch.float16)
        out["dequant"][f"{name}/{N}x{K}"] = bool(torch.equal(quant_kernels.dequantize(q, torch.float16), ref_w))
        for config in (CONFIGS if K % 64 else CONFIGS[1:3]) + FACT + STREAM:
            for m in ((1, 3) if config[0] == 1 else (3, 17))[: 1 if config == FACT[1] else 2]:
                x = torch.randn(m, K).to(torch.float16)
                # the contract: weights rounded to x's dtype, products summed in fp32 (here fp64);
                # "fact" does not round the weights: within fp16's rounding of the output too
                ref = F.linear(x.double(), ref_w.double(), bias.double())
                got = quant_kernels.gemv(x, q, bias, config).double()
                out["gemv"][f"{name}/{N}x{K}/{config}/m{m}"] = ((got - ref).abs().max() / ref.abs().max()).item()
        for config in DP4A:
            for m in (1, 3):
                x = torch.randn(m, K).to(torch.float16)
                ref = _int8_reference(x, q, bias)
                got = quant_kernels.gemv(x, q, bias, config).double()
                out["dp4a"][f"{name}/{N}x{K}/{config}/m{m}"] = ((got - ref).abs().max() / ref.abs().max()).item()
        if not K % 64:
            continue
        # bf16 activations (the served dtype; its output rounding is 2^-9)
        x = torch.randn(1, K).to(torch.bfloat16)
        ref = F.linear(x.double(), q.dequantize(torch.float64), bias.double())
        for config in (FACT[1], STREAM[1]):
            got = quant_kernels.gemv(x, q, bias.to(torch.bfloat16), config).double()
            out["bf16"][f"{name}/{N}x{K}/{config[6]}"] = ((got - ref).abs().max() / ref.abs().max()).item()
    return out


def _int8_reference(x, q, bias):
    """The "dp4a" kernel's sum in float64 from the same int8 rows of x (quant_kernels.quantize_rows):
    per (row, group) scale * xs * D + offset * X (Q4_0: - 8 scale * X), D the codes' integer dot."""
    from hexswarm.model import quant_kernels
    from hexswarm.model.quant import unpack_int4

    codes, xs, xsum = quant_kernels.quantize_rows(x)
    m, k = x.shape
    wq = (unpack_int4(q.qweight) if q.bits == 4 else q.qweight).double().view(q.out_features, k // 32, 32)
    d = torch.einsum("mgj,ngj->mng", codes.double().view(m, k // 32, 32), wq)
    scale = q.scale.double()[None]
    out = scale * xs.double()[:, None] * d
    if q.offset is not None:
        out += q.offset.double()[None] * xsum.double()[:, None]
    elif q.bits == 4:
        out -= 8 * scale * xsum.double()[:, None]
    return out.sum(-1) + bias.double()


def _int8_rows_check() -> dict:
    """quantize_rows against quant.quantize_activations (the interpreter may round a code the other way
    where x * 127 / amax is within an ulp of a half: it computes some float32 steps in float64), and
    the producers that write int8 rows beside their output (add+RMSNorm, SiLU*up) bit for bit as
    quantize_rows of that output."""
    from hexswarm.model import quant_kernels
    from hexswarm.model.layers import add_rmsnorm, silu_mul
    from hexswarm.model.quant import quantize_activations

    res = {}
    x = torch.randn(5, 32 * 37).to(torch.float16)
    x[1, 32:64] = 0  # an all-zero group: scale 0, codes 0
    got, want = quant_kernels.quantize_rows(x), quant_kernels.Int8Rows(*quantize_activations(x))
    res["codes_off_by_more_than_1"] = int(((got.codes.int() - want.codes.int()).abs() > 1).sum())
    res["codes_equal_fraction"] = float((got.codes == want.codes).float().mean())
    res["scales_equal"] = bool(torch.equal(got.scales, want.scales))
    res["sums_err"] = float((got.sums - want.sums).abs().max())
    res["zero_group"] = bool(got.scales[1, 1] == 0 and not got.codes[1, 32:64].any())
    for n in (64, 576):
        h, d, w = (torch.randn(2, n).to(torch.float16), torch.randn(2, n).to(torch.float16),
                   torch.randn(n).to(torch.float16))
        q8 = quant_kernels.Int8Rows.empty(2, n, "cpu")
        out = add_rmsnorm(h, d, w, 1e-5, q8)
        res[f"add_rmsnorm/{n}"] = all(torch.equal(a, b) for a, b in zip(q8, quant_kernels.quantize_rows(out)))
    for f in (64, 1056):  # 1056: a partial last block of the SiLU kernel
        gu = torch.randn(3, 2 * f).to(torch.float16)
        q8 = quant_kernels.Int8Rows.empty(3, f, "cpu")
        out = silu_mul(gu, q8)
        res[f"silu_mul/{f}"] = all(torch.equal(a, b) for a, b in zip(q8, quant_kernels.quantize_rows(out)))
    return res


def _weights():
    from hexswarm.model.quant import QuantLinear, quantize

    for n, k in SHAPES:
        w = torch.randn(n, k) * 0.05
        q4 = quantize(w, "int4")
        yield (n, k), "int8", quantize(w, "int8")
        yield (n, k), "int4", q4
        yield (n, k), "q4_0", QuantLinear(4, q4.qweight, q4.scale, None)  # Q4_0: (q - 8) * d


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)")
def test_kernels_match_reference_in_triton_interpreter():
    res = run_check(__file__, timeout=300)
    assert len(res["dequant"]) == 3 * len(SHAPES) and all(res["dequant"].values()), res["dequant"]
    assert len(res["gemv"]) == 3 * (len(CONFIGS) + 2 + 2 * len(FACT) + 2 * len(STREAM)) * 2 - 3 * 2  # FACT[1]: M = 1
    assert any("stream" in k for k in res["gemv"])
    bad = {k: v for k, v in res["gemv"].items() if not v < 2e-3}  # fp16 output rounding is ~5e-4
    assert not bad, bad
    assert len(res["bf16"]) == 3 * 2
    bad = {k: v for k, v in res["bf16"].items() if not v < 1e-2}
    assert not bad, bad
    # dp4a against the same int8 arithmetic in float64: fp16 output rounding only
    assert len(res["dp4a"]) == 3 * len(SHAPES) * len(DP4A) * 2
    bad = {k: v for k, v in res["dp4a"].items() if not v < 2e-3}
    assert not bad, bad
    rows = res["rows"]
    assert rows["codes_off_by_more_than_1"] == 0 and rows["codes_equal_fraction"] > 0.99, rows
    assert rows["scales_equal"] and rows["sums_err"] < 1e-5 and rows["zero_group"], rows
    assert all(v for k, v in rows.items() if "/" in k) and len([k for k in rows if "/" in k]) == 4, rows


if __name__ == "__main__":
    print(json.dumps(_check()))


def test_int8_activations_switch_picks_exact_kernels(monkeypatch):
    """HEXSWARM_INT8_ACTIVATIONS=0 serves the kernels that keep activations as they are wherever the
    table names "dp4a"; on (the default) the table's own config."""
    from hexswarm.model import quant_kernels
    from hexswarm.model.quant import quantize

    q = quantize(torch.randn(64, 128) * 0.05, "int4")
    monkeypatch.setitem(quant_kernels.GEMV_CONFIGS, (4, 1), (1, 2, 64, 0, 2, 1, "dp4a"))
    monkeypatch.setitem(quant_kernels.GEMV_CONFIGS, (4, 8), (16, 64, 4, 2, 4, 1))
    monkeypatch.delenv(quant_kernels.INT8_ACTIVATIONS_ENV, raising=False)
    assert quant_kernels.gemv_config(q, 1) == (1, 2, 64, 0, 2, 1, "dp4a")
    monkeypatch.setenv(quant_kernels.INT8_ACTIVATIONS_ENV, "0")
    assert quant_kernels.gemv_config(q, 1) == quant_kernels.EXACT_CONFIGS[(4, 1)]
    assert quant_kernels.variant(quant_kernels.gemv_config(q, 1)) == "stream"
    assert quant_kernels.gemv_config(q, 5) == (16, 64, 4, 2, 4, 1)  # not a dp4a entry: as it is


def test_int8_rows_only_for_a_dp4a_cuda_projection():
    """Producers write int8 rows only where the "dp4a" GEMV will read them: never for a dense weight
    or a CPU one (which dequantizes in torch)."""
    from hexswarm.model.quant import int8_rows_for, quantize, quantize_activations

    q = quantize(torch.randn(64, 128) * 0.05, "int8")
    assert int8_rows_for(q, 1, torch.bfloat16) is None  # on CPU
    assert int8_rows_for(torch.randn(64, 128), 1, torch.bfloat16) is None
    # the torch reference of the activations' quantization: |code| <= 127, within half a step
    x = torch.randn(3, 128) * 4
    codes, scales, sums = quantize_activations(x)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127
    back = codes.float().view(3, 4, 32) * scales[..., None]
    assert bool(((back - x.view(3, 4, 32)).abs() <= scales[..., None] / 2 + 1e-6).all())
    assert torch.allclose(sums, x.view(3, 4, 32).sum(-1))


def test_shape_entry_overrides_its_bucket(monkeypatch):
    """gemv_config: a weight whose (bits, bucket, N, K) has an entry of its own gets it; others the bucket's."""
    from hexswarm.model import quant_kernels
    from hexswarm.model.quant import quantize

    q, other = quantize(torch.randn(64, 128) * 0.05, "int4"), quantize(torch.randn(32, 128) * 0.05, "int4")
    monkeypatch.setitem(quant_kernels.GEMV_CONFIGS, (4, 1), (1, 2, 64, 0, 2, 1, "dp4a"))
    monkeypatch.setitem(quant_kernels.GEMV_SHAPE_CONFIGS, (4, 1, 64, 128), (1, 2, 32, 0, 1, 1, "dp4a"))
    assert quant_kernels.gemv_config(q, 1) == (1, 2, 32, 0, 1, 1, "dp4a")
    assert quant_kernels.gemv_config(other, 1) == (1, 2, 64, 0, 2, 1, "dp4a")

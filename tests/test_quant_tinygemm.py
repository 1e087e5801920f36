"""The tinygemm backend (model/quant_tinygemm.py) without a GPU: torch's CPU twin of the kernel (same
formula w = (q - 8) * scale + zero, its own packing) on our Q4_1 and Q4_0 weights converted as the GPU
path converts them, so the scale / zero / code conversion is checked here; the CUDA packing (two codes
a byte) and the kernel's speed are checked on the GPU by tools/bench_quant.py --backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hexswarm.model import quant_tinygemm
from hexswarm.model.quant import BACKEND_ENV, QuantLinear, backend, int8_rows_for, quantize

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                reason="this torch has no CPU tinygemm")


def _q4(n: int, k: int, offset: bool) -> QuantLinear:
    torch.manual_seed(n + k)
    q = quantize(torch.randn(n, k) * 0.05, "int4")
    return q if offset else QuantLinear(4, q.qweight, q.scale, None)  # GGUF Q4_0: w = scale * (q - 8)


@pytest.mark.parametrize("offset", [True, False])
def test_converted_weight_multiplies_as_the_reference(offset):
    q = _q4(64, 256, offset)
    ref_w = q.dequantize()
    x = torch.randn(5, 256).to(torch.bfloat16)
    bias = torch.randn(64).to(torch.bfloat16)
    want = F.linear(x.float(), ref_w, bias.float())
    got = quant_tinygemm.convert(q)(x, bias).float()
    # bf16 scales and zeros, bf16 output: within bf16's rounding of the sum
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-2
    # a wrong zero point (the offset without + 8 * scale) is far off: the check can fail
    wrong = QuantLinear(4, q.qweight, q.scale, None if offset else torch.zeros_like(q.scale))
    off = quant_tinygemm.convert(wrong)(x, bias).float()
    assert ((off - want).abs().max() / want.abs().max()).item() > 0.05


def test_quantlinear_uses_tinygemm_for_few_rows_only(monkeypatch):
    q = _q4(64, 256, True)
    plain = q(torch.randn(2, 256).to(torch.bfloat16))  # before conversion: ours
    before = q.nbytes
    q.to_tinygemm()
    assert q.nbytes == before + q.tinygemm.nbytes and "tinygemm" in repr(q)
    calls = []
    real = quant_tinygemm.TinygemmWeight.__call__
    monkeypatch.setattr(quant_tinygemm.TinygemmWeight, "__call__",
                        lambda self, x, bias: calls.append(x.shape) or real(self, x, bias))
    torch.manual_seed(1)
    few = torch.randn(1, 3, 256).to(torch.bfloat16)
    many = torch.randn(quant_tinygemm.MAX_ROWS + 1, 256).to(torch.bfloat16)
    assert q(few).shape == (1, 3, 64) and calls == [(1, 3, 256)]
    assert q(many).shape == (quant_tinygemm.MAX_ROWS + 1, 64) and len(calls) == 1  # more rows: ours
    assert q(torch.randn(2, 256)).dtype == torch.float32 and len(calls) == 1  # not bf16: ours
    # the one routing decision forward takes, which int8_rows_for asks too (ours on a CPU: torch)
    assert q.route(3, torch.bfloat16) == "tinygemm"
    assert q.route(quant_tinygemm.MAX_ROWS + 1, torch.bfloat16) == q.route(2, torch.float32) == "torch"
    assert int8_rows_for(q, 1, torch.bfloat16) is None
    assert plain.shape == (2, 64)


def test_fits_and_backend_setting(monkeypatch):
    assert quant_tinygemm.fits(_q4(64, 256, True))
    assert not quant_tinygemm.fits(_q4(60, 256, True))  # N not a multiple of 8
    assert not quant_tinygemm.fits(quantize(torch.randn(64, 256), "int8"))
    assert not quant_tinygemm.available(torch.device("cpu"))  # served on CUDA only
    monkeypatch.setenv(BACKEND_ENV, "tinygemm")
    assert backend() == "tinygemm"
    q = _q4(64, 256, True)
    assert q.for_backend().tinygemm is None  # a CPU weight stays as it is
    with pytest.raises(ValueError):
        QuantLinear.cat([q.to_tinygemm(), _q4(64, 256, True)])

"""The gemlite backend (model/quant_gemlite.py) without a GPU: our int8 / Q4_1 / Q4_0 tensors
converted into gemlite's layout dequantize bit for bit as ours (plain torch: gemlite is not a CI
dependency), the int4 words are gemlite's packing, a converted QuantLinear serves the same, and
the backend setting.  When gemlite is installed, its kernels also run on the converted tensors in
Triton's CPU interpreter (a child process that stubs the CUDA queries gemlite makes at import).
The GPU run is tools/bench_gemlite.py, which checks every kernel it times the same way."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hexswarm.errors import UserError
from hexswarm.model import quant_gemlite
from hexswarm.model.quant import BACKEND_ENV, QuantLinear, backend, quantize, unpack_int4

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(40, 32 * 7), (64, 32 * 8)]  # ragged (7 groups, N not a multiple of the tiles) and even


def _weights(n: int, k: int, seed: int = 0):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    q4 = quantize(w, "int4")
    q4_0 = QuantLinear(4, q4.qweight, q4.scale, None)  # made now: converting q4 drops its tensors
    yield "int8", quantize(w, "int8")
    yield "q4_1", q4
    yield "q4_0", q4_0


def _gemlite_pack_over_cols(codes: torch.Tensor) -> torch.Tensor:
    """gemlite's pack_weights_over_cols_torch(W, 4, 32, transpose=True), restated: element j of a
    row at bits 4 * (j % 8) of word j // 8, then [K/8, N]."""
    n, k = codes.shape
    words = torch.zeros(n, k // 8, dtype=torch.int64)
    for j in range(k):
        words[:, j // 8] |= codes[:, j].long() << (4 * (j % 8))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).t().contiguous()


@pytest.mark.parametrize("n,k", SHAPES)
def test_conversion_dequantizes_bit_for_bit_as_ours(n, k):
    groups = k // 32
    for name, q in _weights(n, k):
        t = quant_gemlite.convert(q)
        assert torch.equal(quant_gemlite.dequantize(t), q.dequantize()), name
        assert torch.equal(t["scales"][:groups], q.scale.t()) and not t["scales"][groups:].any(), name
        if q.bits == 8:  # our bytes, viewed [K, N]: no copy
            assert t["W_q"].shape == (k, n) and t["W_q"].data_ptr() == q.qweight.data_ptr()
            assert t["group_mode"] == quant_gemlite.MODE_SCALE and t["zeros"].numel() == 0
        else:
            assert t["W_q"].dtype == torch.int32 and t["W_q"].is_contiguous()
            assert torch.equal(t["W_q"], _gemlite_pack_over_cols(unpack_int4(q.qweight)))
            if q.offset is None:  # Q4_0: gemlite's scalar zero point, w = (q - 8) * scale
                assert t["group_mode"] == quant_gemlite.MODE_SHIFT_SCALE and t["zeros"].item() == 8
            else:  # Q4_1: w = q * scale + zero with our offset as the zero
                assert t["group_mode"] == quant_gemlite.MODE_FMA and torch.equal(t["zeros"][:groups], q.offset.t())
        # a slice of whole groups (the chunked dequantize of the prefill path)
        assert torch.equal(quant_gemlite.dequantize(t, torch.float32, 64, 160), q.dequantize()[:, 64:160]), name


def test_converted_quantlinear_serves_the_same_on_cpu():
    n, k = SHAPES[0]
    x = torch.randn(3, 2, k)
    for name, q in _weights(n, k, seed=1):
        q = QuantLinear(q.bits, q.qweight.clone(), q.scale.clone(), None if q.offset is None else q.offset.clone())
        bias = torch.randn(n)
        want, nbytes, dense = q(x, bias), q.nbytes, q.dequantize(torch.bfloat16)
        q.to_gemlite()
        assert q.qweight is None and q.gemlite is not None and "gemlite" in repr(q)
        assert torch.equal(q(x, bias), want), name  # off CUDA: dequantize + F.linear, as before
        assert torch.equal(q.dequantize(torch.bfloat16), dense), name
        assert q.nbytes == nbytes + (4 if name == "q4_0" else 0)  # Q4_0: gemlite's one int32 zero point
        with pytest.raises(ValueError):
            QuantLinear.cat([q, q])


def test_backend_setting(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert backend() == "hexswarm"
    monkeypatch.setenv(BACKEND_ENV, "gemlite")
    assert backend() == "gemlite"
    q = quantize(torch.randn(64, 64), "int4")
    assert q.for_backend() is q and q.gemlite is None  # gemlite serves CUDA weights only
    monkeypatch.setenv(BACKEND_ENV, "cutlass")
    with pytest.raises(UserError):
        backend()


# ---- gemlite's kernels in Triton's interpreter (only where gemlite is installed) ----------------
KERNELS = [("GEMV_REVSPLITK", 1), ("GEMV_SPLITK", 1), ("GEMM_SPLITK", 8)]


def _stub_cuda_for_gemlite_import() -> None:
    """gemlite reads the device's capability, name and SM count at import, and Triton's active
    driver; on a CPU host there is none.  Give it an sm_90 answer (the interpreter ignores it)."""
    import types

    import triton
    from triton.backends.compiler import GPUTarget

    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(name="interpreter",
                                                                             multi_processor_count=4)
    torch.cuda.device_count = lambda: 0

    class Driver:
        utils = types.SimpleNamespace(get_device_properties=lambda i: {"max_shared_mem": 232448})

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

    triton.runtime.driver.set_active(Driver())


def _config_file(path: Path) -> None:
    """One config per (kernel, shape, format), as a loaded gemlite config file: its pruner then
    takes it without autotuning (autotuning times kernels on a GPU)."""
    cfg: dict = {}
    for n, k in SHAPES[:1]:
        for bits, e in ((8, 1), (4, 8)):
            for name, m in KERNELS:
                kw, warps, stages = quant_gemlite.CANDIDATES[name][1]
                entry = dict(kw, num_warps=warps, num_stages=stages)
                if name == "GEMV_REVSPLITK":
                    entry["BLOCK_SIZE_K"] = min(entry["BLOCK_SIZE_K"], 16)  # two passes within a group
                if name == "GEMM_SPLITK":
                    entry["BLOCK_SIZE_M"] = 16
                cfg.setdefault(name, {})[str((m, n, k, 32, e, 100 + bits))] = entry
    path.write_text(json.dumps(cfg))


def _interpreted(config: str) -> dict:
    """Runs in the child process (TRITON_INTERPRET=1): gemlite's kernels on our converted tensors."""
    _stub_cuda_for_gemlite_import()
    import torch.nn.functional as F

    os.environ[quant_gemlite.CONFIG_ENV] = config
    gemlite = quant_gemlite.load()
    assert gemlite is not None, quant_gemlite.FAILURE
    out = {}
    n, k = SHAPES[0]
    for name, q in _weights(n, k, seed=2):
        ref_w = q.dequantize(torch.float16)
        w = q.to_gemlite().gemlite
        bias = torch.randn(n).to(torch.float16)
        for kernel, m in KERNELS:
            x = torch.randn(m, k).to(torch.float16)  # fp16: the interpreter computes through numpy
            ref = F.linear(x.double(), ref_w.double(), bias.double())
            got = w.run(gemlite, x, bias, kernel).double()
            out[f"{name}/{kernel}/m{m}"] = ((got - ref).abs().max() / ref.abs().max()).item()
    return out


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemlite") is None or importlib.util.find_spec("triton") is None,
                    reason="needs gemlite and triton (its CPU interpreter)")
def test_gemlite_kernels_match_reference_in_triton_interpreter(tmp_path):
    config = tmp_path / "gemlite.json"
    _config_file(config)
    path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, __file__, str(config)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(res) == 3 * len(KERNELS), res
    assert all(v < 2e-3 for v in res.values()), res  # fp16 output rounding, fp32 sums


if __name__ == "__main__":
    print(json.dumps(_interpreted(sys.argv[1])))

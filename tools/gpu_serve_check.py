#!/usr/bin/env python3
"""On a CUDA machine: the served stage engine (continuous batching, chunked prefill, CUDA-graph
buckets, micro-batches, TP over NCCL when two GPUs are there) against `generate` on the CPU in
float32, and the batched sampler on the GPU against the same sampler on the CPU.

    python tools/gpu_serve_check.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from hexswarm.model.tiny import TinySpec, make_tiny_llama  # noqa: E402
from hexswarm.runtime.local_pipeline import LocalPipeline  # noqa: E402
from hexswarm.runtime.offline import GenerateJob, generate  # noqa: E402
from hexswarm.runtime.sampling import SamplingParams, sample_batch  # noqa: E402
from hexswarm.runtime.stage_engine import EngineSettings  # noqa: E402
from gpu_check import write_report  # noqa: E402

PROMPTS = ["Once upon a time", "The quick brown fox jumps over", "0123456789", "Hello", "Pipeline stages on GPUs",
           "A much longer prompt that needs several chunks when the step budget is small, so the chunked prefill "
           "path runs"]
PARAMS = [SamplingParams(), SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=5)]


def sampler_check() -> dict:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 32000, generator=g) * 3
    params = [SamplingParams(temperature=[0.0, 0.5, 1.0, 1.3][i % 4], top_k=[0, 5, 50, 0][i % 4],
                             top_p=[1.0, 0.9, 0.5, 0.99][i % 4], seed=i) for i in range(32)]
    steps = list(range(32))
    cpu = sample_batch(logits, params, steps)
    gpu = sample_batch(logits.cuda(), params, steps)
    return {"check": "sampler", "rows": 32, "equal": sum(a == b for a, b in zip(cpu, gpu))}


def chunk_attention_check(dtype: torch.dtype) -> dict:
    """The one-launch chunk kernel against SDPA per chunk (the path it replaces), on a 7B-shaped head layout."""
    from hexswarm.model.attention import cached_attention, chunk_attention, chunk_work

    torch.manual_seed(0)
    n_q, n_kv, D, max_len = 32, 8, 128, 512
    kc = torch.randn(4, max_len, n_kv, D, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    segs = [(0, 100, 1, 0), (100, 37, 2, 60), (137, 1, 3, 300)]  # (row, length, slot, start)
    N = 138
    qkv = torch.randn(N, (n_q + 2 * n_kv) * D, device="cuda", dtype=dtype)
    work = torch.tensor(chunk_work(segs), device="cuda")
    out = torch.full((N, n_q * D), float("nan"), device="cuda", dtype=dtype)
    chunk_attention(qkv, kc, vc, work, n_q, n_kv, out)
    worst = 0.0
    for off, L, slot, start in segs:
        q = qkv[off:off + L, :n_q * D].view(1, L, n_q, D).double()
        ref = cached_attention(q, kc[slot:slot + 1, :start + L].double(), vc[slot:slot + 1, :start + L].double(),
                               torch.tensor([start], device="cuda"), torch.tensor([start + L], device="cuda"))
        got = out[off:off + L].view(1, L, n_q, D).double()
        worst = max(worst, float((got - ref).norm() / ref.norm()))
    return {"check": "chunk attention vs float64 SDPA", "dtype": str(dtype), "rel_err": worst,
            "all_written": bool(torch.isfinite(out).all())}


def served(model: Path, layout, settings: EngineSettings, dtype: str, gpus=None, linked: bool = False) -> dict[str, list[int]]:
    """linked: each engine in its own process, steps over local links (what CUDA nodes on one host do)."""
    pipe = LocalPipeline(model, layout, n_slots=8, max_len=256, settings=settings, device="cuda", dtype=dtype,
                         gpus=gpus, processes=linked, links_dir=tempfile.mkdtemp() if linked else None)
    try:
        for i, p in enumerate(PROMPTS):
            pipe.start(f"r{i}", p, 24, PARAMS[i % 2])
        return {rid: m["tokens"] for rid, m in pipe.wait(len(PROMPTS), timeout=300).items()}
    finally:
        pipe.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    spec = TinySpec(layers=8, hidden=1024, heads=16, kv_heads=8, intermediate=2816, vocab=512, seed=3,
                    max_positions=1024)
    model = make_tiny_llama(work / "wide", spec)
    report = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "checks": [sampler_check()]}
    ok = report["checks"][0]["equal"] == 32
    print(json.dumps(report["checks"][0]), flush=True)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        c = chunk_attention_check(dtype)
        ok &= c["rel_err"] < tol and c["all_written"]
        report["checks"].append(c)
        print(json.dumps(c), flush=True)
    refs = {f"r{i}": generate(GenerateJob(str(model), p, max_new_tokens=24, sampling=PARAMS[i % 2]))["tokens"]
            for i, p in enumerate(PROMPTS)}
    cases = [("1 stage", [(1, 8)], EngineSettings(), None, False),
             ("1 stage, chunked prefill", [(1, 8)], EngineSettings(max_step_tokens=6), None, False),
             ("2 stages, 2 micro-batches", [(1, 4), (1, 4)], EngineSettings(max_step_tokens=16, micro_batches=2), None,
              False),
             ("3 stages, engine processes on local links", [(1, 2), (1, 4), (1, 2)], EngineSettings(max_step_tokens=16),
              None, True),
             ("2 stages, engine processes on local links, 2 micro-batches", [(1, 4), (1, 4)],
              EngineSettings(max_step_tokens=16, micro_batches=2), None, True),
             ("2 stages, engine processes on local links, step budget 512", [(1, 4), (1, 4)],
              EngineSettings(max_step_tokens=512), None, True)]
    if torch.cuda.device_count() >= 2:
        cases.append(("TP 2 (NCCL, GPUs 0+1) + TP 1", [(2, 4), (1, 4)], EngineSettings(), [(0, 1), (0,)], False))
    for name, layout, settings, gpus, linked in cases:
        for dtype in ("float32", "bfloat16"):
            try:
                got = served(model, layout, settings, dtype, gpus, linked)
                equal = sum(got[r] == refs[r] for r in refs)
                err = None
            except Exception as e:  # report and go on: the other cases still say something
                equal, err = 0, f"{type(e).__name__}: {e}"
            check = {"check": "served vs CPU generate", "case": name, "dtype": dtype, "requests": len(refs),
                     "token_identical_requests": equal, "error": err}
            if dtype == "float32":
                ok &= equal == len(refs)
            report["checks"].append(check)
            print(json.dumps(check), flush=True)
    return write_report(report, ok, a.out)


if __name__ == "__main__":
    sys.exit(main())

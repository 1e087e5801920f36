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
    """The one-launch chunk kernel against float64 SDPA per chunk (the path it replaces), on a 7B-shaped
    head layout, over a paged cache whose slots hold interleaved blocks."""
    from hexswarm.model.attention import cached_attention, chunk_attention, chunk_work
    from hexswarm.model.kv_cache import KVCache

    torch.manual_seed(0)
    n_q, n_kv, D, max_seq_len = 32, 8, 128, 512
    kv = KVCache(1, 4, max_seq_len, n_kv, D, dtype, "cuda")
    for pos in range(0, 400, 16):  # grow the slots in turn: each slot's blocks are scattered over the pool
        kv.prepare([(s, pos, 16) for s in range(4)])
    kv.k.normal_()
    kv.v.normal_()
    kc, vc = kv.k[0], kv.v[0]
    segs = [(0, 100, 1, 0), (100, 37, 2, 60), (137, 1, 3, 300)]  # (row, length, slot, start)
    N = 138
    qkv = torch.randn(N, (n_q + 2 * n_kv) * D, device="cuda", dtype=dtype)
    work = torch.tensor(chunk_work(segs), device="cuda")
    out = torch.full((N, n_q * D), float("nan"), device="cuda", dtype=dtype)
    chunk_attention(qkv, kc, vc, kv.table, work, n_q, n_kv, out)
    worst = 0.0
    for off, L, slot, start in segs:
        q = qkv[off:off + L, :n_q * D].view(1, L, n_q, D).double()
        k_all, v_all = kv.gather(0, torch.tensor([slot], device="cuda"), start + L)
        ref = cached_attention(q, k_all.double(), v_all.double(),
                               torch.tensor([start], device="cuda"), torch.tensor([start + L], device="cuda"))
        got = out[off:off + L].view(1, L, n_q, D).double()
        worst = max(worst, float((got - ref).norm() / ref.norm()))
    return {"check": "chunk attention vs float64 SDPA (paged)", "dtype": str(dtype), "rel_err": worst,
            "all_written": bool(torch.isfinite(out).all())}


def decode_attention_check(dtype: torch.dtype) -> dict:
    """The decode kernel (split and unsplit) over a paged cache whose slots hold interleaved blocks,
    against float64 SDPA over the gathered keys."""
    from hexswarm.model.attention import cached_attention, decode_attention
    from hexswarm.model.kv_cache import KVCache

    torch.manual_seed(1)
    n_q, n_kv, D, max_seq_len = 32, 8, 128, 512
    kv = KVCache(1, 64, max_seq_len, n_kv, D, dtype, "cuda")
    for pos in range(0, 400, 16):
        kv.prepare([(s, pos, 16) for s in range(64)])
    kv.k.normal_()
    kv.v.normal_()
    worst = 0.0
    for B in (1, 4, 64):  # 1 and 4 split the keys (flash-decoding), 64 does not
        slots = torch.arange(B, device="cuda")
        pos = torch.tensor([(399 - 37 * i) % 400 for i in range(B)], device="cuda")
        qkv = torch.randn(B, (n_q + 2 * n_kv) * D, device="cuda", dtype=dtype)
        out = decode_attention(qkv, kv.k[0], kv.v[0], kv.table, slots, pos, n_q, n_kv)
        L = int(pos.max()) + 1
        k_all, v_all = kv.gather(0, slots, L)
        q = qkv[:, :n_q * D].view(B, 1, n_q, D).double()
        ref = cached_attention(q, k_all.double(), v_all.double(), pos, pos + 1).reshape(B, n_q * D)
        worst = max(worst, float((out.double() - ref).norm() / ref.norm()))
    return {"check": "decode attention vs float64 SDPA (paged)", "dtype": str(dtype), "rel_err": worst}


def served(model: Path, layout, settings: EngineSettings, dtype: str, gpus=None, linked: bool = False,
           kv_tokens: int = 0) -> dict[str, list[int]]:
    """linked: each engine in its own process, steps over local links (what CUDA nodes on one host do);
    kv_tokens: each stage's KV pool (0: 8 slots x 256 positions)."""
    pipe = LocalPipeline(model, layout, max_batch=8, max_seq_len=256, settings=settings, device="cuda", dtype=dtype,
                         gpus=gpus, processes=linked, links_dir=tempfile.mkdtemp() if linked else None,
                         kv_tokens=kv_tokens)
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
        for c in (chunk_attention_check(dtype), decode_attention_check(dtype)):
            ok &= c["rel_err"] < tol and c.get("all_written", True)
            report["checks"].append(c)
            print(json.dumps(c), flush=True)
    refs = {f"r{i}": generate(GenerateJob(str(model), p, max_new_tokens=24, sampling=PARAMS[i % 2]))["tokens"]
            for i, p in enumerate(PROMPTS)}
    # (name, layout, settings, gpus, linked, kv_tokens); 192 positions: the longest request (10 blocks) and
    # one short one, or four short ones, at a time: the others wait for blocks
    cases = [("1 stage", [(1, 8)], EngineSettings(), None, False),
             ("1 stage, KV pool of 192 positions", [(1, 8)], EngineSettings(), None, False, 192),
             ("2 stages on local links, KV pool of 192 positions", [(1, 4), (1, 4)], EngineSettings(max_step_tokens=16),
              None, True, 192),
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
    for name, layout, settings, gpus, linked, *kv in cases:
        for dtype in ("float32", "bfloat16"):
            try:
                got = served(model, layout, settings, dtype, gpus, linked, *kv)
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

#!/usr/bin/env python
"""Where a batch-1 decode step's time goes, per kind of kernel, and how fast a step could be
with this kernel structure: the question behind issue 14's floor targets.

In one run, on one GPU, for each weight format (bf16, int8, int4 with each --int4-backends):

* the step's time replayed from its CUDA graph (bench_gpu's decode loop, argmax included);
* the kernels of a few graph replays under torch.profiler, summed per step by kind (the
  projections, attention, norms, rope, silu, fills and casts, ...) and their count: the busy
  time, and the step time less it (launch gaps between kernels);
* a streaming skeleton: per layer, one read-only kernel per projection over exactly its
  bytes (fresh buffers, so nothing is an L2 hit), captured in one CUDA graph: the step time
  if every projection read its weights as fast as a kernel that does nothing else, and the
  same skeleton as one kernel over all the bytes (the floor's own achievable rate).

With programmatic dependent launch (model/pdl.py, on by default on Hopper) a kernel starts while the one
before finishes and waits inside: its duration then includes that wait, kinds overlap and the busy time
exceeds the step.  HEXSWARM_PDL=0 gives the plain breakdown.

    python tools/decode_profile.py --json prof.json        # the GPU run
    python tools/decode_profile.py --device cpu --tiny     # the code path on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "tools")):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_gpu  # noqa: E402
import bench_quant  # noqa: E402

from hexswarm.model.quant import BACKEND_ENV, QuantLinear  # noqa: E402

# kernel name -> kind (first match wins)
KINDS = (
    ("quant gemv", r"_qgemv|qgemv_fact"),
    ("act quantize", r"_quantize_rows"),
    ("tinygemm", r"tinygemm|int4pack|_weight_int4"),
    ("dequant", r"_dequant_kernel"),
    ("attention", r"decode_attention|_decode_reduce|_attn|attention|flash"),
    ("rope+kv write", r"rotary"),
    ("add+rmsnorm", r"rmsnorm"),
    ("silu*mul", r"silu"),
    ("gemm (cuBLAS)", r"gemm|gemv|sm90|sm80|cutlass|xmma|nvjet"),
    ("fill (zeros)", r"fill|FillFunctor|memset"),
    ("copy/cast", r"copy|Copy|direct_copy|cast"),
    ("argmax/sampling", r"argmax|reduce|Reduce"),
    ("embedding", r"index|embedding|gather"),
)


def kind_of(name: str) -> str:
    for kind, pat in KINDS:
        if re.search(pat, name):
            return kind
    return "other"


@torch.inference_mode()
def profile_step(model, B: int, P: int, steps: int) -> dict:
    """Kernel time per step by kind over `steps` graph replays (CUDA) or eager steps (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = model.device.type == "cuda"
    model.fast_kernels = True
    kv = model.new_kv_cache(B, P + steps + 8)
    slots = list(range(B))
    runner = model.step_graphs(kv, use_graphs=cuda)
    model(model.embed(bench_gpu._ids(B, P, model.cfg.vocab_size, model.device, 4)), kv, slots, [0] * B)
    nxt = torch.full((B,), 5, dtype=torch.long, device=model.device)
    for i in range(3):
        nxt = runner.step(nxt, slots, [P + i] * B).argmax(-1)
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for i in range(steps):
            nxt = runner.step(nxt, slots, [P + 3 + i] * B).argmax(-1)
        if cuda:
            torch.cuda.synchronize()
    per_kind: dict = defaultdict(lambda: {"us": 0.0, "count": 0})
    names: dict = defaultdict(lambda: {"us": 0.0, "count": 0})
    for e in prof.events():
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not cuda and e.cpu_parent is not None:
            continue
        us = (e.device_time if cuda else e.cpu_time) or 0.0
        k = kind_of(e.name)
        per_kind[k]["us"] += us / steps
        per_kind[k]["count"] += 1 / steps
        names[e.name[:90]]["us"] += us / steps
        names[e.name[:90]]["count"] += 1 / steps
    del runner, kv
    top = sorted(names.items(), key=lambda kv_: -kv_[1]["us"])[:16]
    return {"kinds": {k: {"us": round(v["us"], 1), "count": round(v["count"], 1)} for k, v in
                      sorted(per_kind.items(), key=lambda kv_: -kv_[1]["us"])},
            "busy_us": round(sum(v["us"] for v in per_kind.values()), 1),
            "kernels": round(sum(v["count"] for v in per_kind.values()), 1),
            "top": {n: {"us": round(v["us"], 1), "count": round(v["count"], 1)} for n, v in top}}


def projection_bytes(model) -> list[list[int]]:
    """Per decoder layer, the bytes each projection reads in a batch-1 step (one layout)."""
    out = []
    for layer in model.layers:
        sizes = []
        for name in ("qkv_weight", "o_weight", "gate_up_weight", "down_weight"):
            w = getattr(layer, name)
            if isinstance(w, QuantLinear):  # tinygemm's layout serves batch 1 where it is held
                sizes.append(w.tinygemm.nbytes if w.tinygemm is not None else w.nbytes)
            else:
                sizes.append(w.numel() * w.element_size())
        out.append(sizes)
    return out


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _read_kernel(src, out, n_words, per_prog, BLOCK: tl.constexpr):
        # streams int32 words [pid * per_prog, +per_prog) and keeps a sum, so the loads stay
        pid = tl.program_id(0)
        start = pid.to(tl.int64) * per_prog  # the one-kernel buffer passes 2^31 words
        acc = tl.zeros((BLOCK,), dtype=tl.int32)
        for off in range(start, start + per_prog, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            acc += tl.load(src + idx, mask=idx < n_words, other=0)
        tl.store(out + pid, tl.sum(acc, axis=0))

    HAVE_TRITON = True
except Exception:  # pragma: no cover - CPU-only hosts
    HAVE_TRITON = False


def read_launch(buf: torch.Tensor, out: torch.Tensor, progs: int, block: int, warps: int) -> None:
    n = buf.numel()
    per = triton.cdiv(triton.cdiv(n, progs), block) * block
    grid = triton.cdiv(n, per)
    _read_kernel[(grid,)](buf, out, n, per, BLOCK=block, num_warps=warps)


@torch.inference_mode()
def skeleton(layer_bytes: list[list[int]], device, clock, progs_per_sm: int, block: int, warps: int) -> dict:
    """ms of a graph of read-only kernels, one per projection per layer (its own buffer), and of
    one kernel over the same total bytes."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    bufs = [[torch.empty(b // 4, dtype=torch.int32, device=device) for b in sizes] for sizes in layer_bytes]
    out = torch.empty(sms * 64, dtype=torch.int32, device=device)
    total = sum(sum(s) for s in layer_bytes)
    flat = torch.empty(total // 4, dtype=torch.int32, device=device)

    def per_proj():
        for layer in bufs:
            for b in layer:
                read_launch(b, out, sms * progs_per_sm, block, warps)

    def one():
        read_launch(flat, out, sms * progs_per_sm, block, warps)

    res = {}
    for key, fn in (("per_projection", per_proj), ("one_kernel", one)):
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        res[key] = clock.median(g.replay, 2, 5)
        del g
    res["bytes"] = total
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--modes", default="bf16,int8,int4")
    ap.add_argument("--int4-backends", default="hexswarm,tinygemm")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--skeleton", default="4:1024:4,8:1024:4,2:2048:8",
                    help="read-kernel configs programs-per-SM:block:warps, the best is kept ('' skips)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    # bench_quant's model maker and decode loop with its defaults
    qa = bench_quant.parse_args(["--device", a.device, "--layers", str(a.layers)] + (["--tiny"] if a.tiny else []))
    device = torch.device(a.device)
    clock = bench_gpu.Clock(device)
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    from hexswarm.model import pdl

    res: dict = {"env": bench_gpu._env(device), "args": vars(a), "modes": {}, "pdl": pdl.enabled(device)}
    bw = bench_gpu.copy_bandwidth(device, clock, qa.copy_bytes)
    res["copy_GBps"] = bw / 1e9
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    env_backend = os.environ.get(BACKEND_ENV)
    work, model_dir = bench_quant.scratch_model(qa, device, log, "hexswarm-decode-profile-")
    wanted = [m.strip() for m in a.modes.split(",") if m.strip()]
    runs = [(m, m, "hexswarm") for m in wanted if m != "int4"]
    if "int4" in wanted:
        runs += [(f"int4/{b}", "int4", b) for b in a.int4_backends.split(",") if b]
    try:
        for key, mode, backend in runs:
            os.environ[BACKEND_ENV] = backend
            model = bench_quant.whole_model(model_dir, device, mode)
            nbytes = bench_quant.streamed_bytes(model)
            floor = nbytes / bw * 1e3
            ms = bench_gpu.engine_decode_ms(model, a.batch, qa.decode_prompt, qa.decode_steps, clock, qa.warmup,
                                            qa.repeats, "graph" if device.type == "cuda" else "eager")
            prof = profile_step(model, a.batch, qa.decode_prompt, a.profile_steps)
            entry = {"ms": ms, "floor_ms": floor, "x_floor": ms / floor, "bytes": nbytes, **prof,
                     "gap_us": round(ms * 1e3 - prof["busy_us"], 1)}
            if device.type == "cuda" and HAVE_TRITON and a.skeleton:
                best = None
                for spec in a.skeleton.split(","):
                    pps, block, warps = (int(x) for x in spec.split(":"))
                    sk = skeleton(projection_bytes(model), device, clock, pps, block, warps)
                    sk["config"] = spec
                    if best is None or sk["per_projection"] < best["per_projection"]:
                        best = sk
                best["per_projection_x_floor"] = best["per_projection"] / (best["bytes"] / bw * 1e3)
                best["one_kernel_x_floor"] = best["one_kernel"] / (best["bytes"] / bw * 1e3)
                entry["skeleton"] = best
            res["modes"][key] = entry
            log(f"{key}: {ms:.3f} ms/step, floor {floor:.3f} (x{ms / floor:.2f}); kernels {prof['kernels']} "
                f"busy {prof['busy_us']:.0f} us, gap {entry['gap_us']:.0f} us")
            for k, v in prof["kinds"].items():
                log(f"    {k:18s} {v['us']:9.1f} us  x{v['count']:.0f}")
            if "skeleton" in entry:
                sk = entry["skeleton"]
                log(f"    skeleton ({sk['config']}): per projection {sk['per_projection']:.3f} ms "
                    f"(x{sk['per_projection_x_floor']:.2f} of floor), one kernel {sk['one_kernel']:.3f} ms "
                    f"(x{sk['one_kernel_x_floor']:.2f})")
            del model
            bench_quant.release(device)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        if env_backend is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = env_backend
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()

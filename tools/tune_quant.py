#!/usr/bin/env python
"""Tune the quantized GEMV (hexswarm/model/quant_kernels.py) on one GPU: for int8 and int4,
each M bucket (1, 8, 16, 32, 64 rows), a compact grid of kernel configs of every kernel variant
("deq": dequantize each weight, round it to bf16, multiply; "fact", M = 1 rows: scales factored
out of the loop; "stream", M = 1: the same kernel with one weight row and one warp per program, no
split-K) on the 7B layer shapes; every config's output checked against the torch
reference; each timed as the sum over the shapes of a CUDA-graph replay (median of repeats) over
enough weight copies that every call reads its weights from HBM, not L2.  Also times dequantize
+ cuBLAS (the prefill path) per bucket: a bucket where that wins gets no GEMV config (the
crossover).

Prints and writes (--json) the best config per (bits, bucket), and the best per variant, with
per-shape microseconds and GB/s against the device copy bandwidth measured in the same run;
--apply rewrites quant_kernels.py's table (GEMV_CONFIGS) with them (buckets not measured keep
their entry).  --decode then serves the result in the same process and runs
tools/bench_quant.py's measurements (bf16 / int8 / int4 7B decode against their floors, the
kernel check), into the same JSON.  Needs only torch and triton for the sweep; meant to take
< 5 minutes on an H100 with --decode (--budget-s bounds the sweep; configs are tried best-guess
first: every M = 1 candidate, then round robin over the other buckets, so a cut sweep still
covers every bucket).

Without a GPU, under TRITON_INTERPRET=1 (Triton's CPU interpreter), the same command checks
every variant's first configs against the reference on tiny shapes (int8, Q4_1 and Q4_0, M = 1,
8, 16; about a minute), times nothing, skips --decode and applies nothing.

    PYTHONPATH=$PWD python3 tools/tune_quant.py --budget-s 100 --decode --json tune.json --apply  # the GPU run
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python3 tools/tune_quant.py --decode --json tune-cpu.json   # on CPU
    python3 tools/tune_quant.py --from-json tune.json --apply                 # its table, on any machine
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from gpu_clock import Clock, copy_bandwidth  # noqa: E402  (torch only)
from hexswarm.model import quant_kernels  # noqa: E402  (torch + triton only)
from hexswarm.model.quant import quantize  # noqa: E402

KERNELS = REPO / "hexswarm" / "model" / "quant_kernels.py"
# Llama-2-7B projections as served: fused QKV, o, fused gate+up, down (N, K)
SHAPES = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))
CLOCK = Clock(torch.device("cuda"))
COLD_BYTES = 256 << 20  # weight copies per graph: > 5x the H100's 50 MB L2


# "fact" tiles at M = 1 (BLOCK_N, BLOCK_G, num_warps), best guesses first: a thread holds
# BLOCK_N / (32 * warps) rows of the same groups (the activations it loads serve them all); chosen
# from the compiled loop (sm_90 SASS, Triton 3.6: ~3.6-4.6 instructions per weight, no spills)
FACT_TILES = [(256, 2, 2), (128, 2, 1), (512, 2, 4), (256, 4, 2), (128, 4, 2), (256, 2, 4), (64, 2, 1),
              (128, 4, 1)]  # (128, 4, 1) spills registers for int8


# "stream" tiles at M = 1 (BLOCK_N, BLOCK_G, num_warps, WAVES, num_stages): few rows, many groups,
# partial sums across groups added after the loop: a warp streams its rows' bytes as a plain reader
# does, over a grid of N / BLOCK_N programs (no split-K: no zeroed buffer, no atomics, no cast).
# H100 (BENCHMARKS run 26b): one row and one warp per program measured best, every stream tile beat the wide ones.
STREAM_TILES = [(1, 32, 1, 0, 1), (2, 32, 1, 0, 1), (4, 32, 1, 0, 1), (1, 64, 1, 0, 1), (2, 16, 1, 0, 1),
                (4, 16, 1, 0, 1), (1, 16, 1, 0, 1), (8, 16, 1, 0, 1), (4, 8, 1, 0, 1), (2, 64, 1, 0, 1),
                (1, 128, 2, 0, 1), (1, 32, 1, 0, 2), (2, 32, 1, 0, 2), (1, 32, 1, 0, 3), (4, 32, 1, 0, 2),
                (1, 64, 2, 0, 1), (2, 32, 2, 0, 1), (8, 8, 1, 0, 1), (1, 128, 4, 0, 1), (2, 128, 2, 0, 1)]


# "dp4a" tiles at M = 1 (BLOCK_N, BLOCK_G, num_warps, num_stages): the activations quantized to int8
# per group (one small kernel), then stream-like tiles whose inner loop is a dp4a per 4 weights;
# rows per thread share each activation load.
DP4A_TILES = [(2, 64, 2, 1), (2, 64, 2, 2), (2, 64, 2, 3), (2, 128, 4, 1), (2, 128, 2, 1), (2, 64, 4, 1),
              (1, 64, 2, 1), (2, 64, 1, 2), (1, 128, 2, 1), (2, 128, 4, 2), (4, 128, 4, 1), (2, 32, 1, 3),
              (1, 32, 1, 1), (2, 32, 1, 1), (4, 32, 1, 1), (1, 64, 1, 1), (2, 16, 1, 1), (4, 16, 1, 1),
              (8, 16, 1, 1), (8, 32, 2, 1), (4, 32, 1, 2), (1, 32, 1, 2), (1, 128, 4, 1), (4, 32, 2, 1),
              (2, 32, 2, 1), (8, 32, 4, 1), (4, 64, 2, 1), (2, 64, 1, 1), (4, 64, 4, 1), (16, 32, 4, 1),
              (4, 16, 2, 1)]


# "dp4a" tiles for a few rows (BLOCK_N, BLOCK_G, num_warps, num_stages; BLOCK_M = the bucket): each
# weight word, loaded once, meets every row's activations; each tile also as "dp4a_late" (words summed after
# the loop: 10-30% fewer SASS instructions in the loop at 8 rows, no shuffles; untimed when added)
DP4A_ROWS_TILES = [(2, 32, 1, 1), (1, 32, 1, 1), (4, 32, 2, 1), (2, 16, 1, 1), (4, 16, 1, 1), (2, 32, 2, 1),
                   (8, 16, 2, 1), (2, 64, 2, 1), (4, 32, 1, 1), (1, 64, 2, 1)]


def candidates(bucket: int, variants=("fact", "deq")) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, BLOCK_G, WAVES, num_warps, num_stages[, variant]), best guesses first:
    each tile with split-K to 2 waves, then without, then 4 and 1 waves (those share the first's
    kernel).  A 6-field config is the "deq" kernel; "fact" configs (BLOCK_M 1) come first at M = 1
    and after the "deq" ones at M = 8 (one program per row there)."""
    later = {2: 0.0, 0: 0.5, 4: 1.2, 1: 2.4}  # rank offsets of the WAVES values
    if bucket == 1:
        tiles = [(1, 32, 8, 4), (1, 64, 4, 4), (1, 64, 8, 8), (16, 64, 4, 4), (1, 128, 4, 8), (1, 16, 8, 4),
                 (1, 32, 16, 8), (1, 128, 2, 4), (1, 8, 16, 2)]  # (16, ...): tensor cores with 15 idle rows
    else:
        bms = {8: (16,), 16: (16,), 32: (32, 16), 64: (64, 32)}.get(bucket, (16,))
        # (64, 8) with 4 warps spills registers at BLOCK_M 16 (sm_90 SASS, Triton 3.9): 8 warps there
        tiles = [(bm, n, g, w) for n, g, w in [(64, 4, 4), (64, 8, 8), (128, 4, 8), (32, 8, 4), (128, 8, 8),
                                               (32, 4, 4)] for bm in bms]
    ranked = sorted(((i + later[v], (bm, n, g, v, w, 1)) for i, (bm, n, g, w) in enumerate(tiles) for v in later))
    deq = [c for _, c in ranked]
    bm, n, g, w = tiles[0]
    deq.insert(6, (bm, n, g, 2, w, 3))  # Triton's own pipelining on top of the manual prefetch
    fact = []
    if bucket <= 8:
        ranked = sorted((i + later[v], (1, n, g, v, w, 1, "fact")) for i, (n, g, w) in enumerate(FACT_TILES)
                        for v in later)
        fact = [c for _, c in ranked][: 16 if bucket == 1 else 4]
    fact = fact if "fact" in variants else []
    deq = deq if "deq" in variants else []
    if bucket == 1:  # the variants alternate, the new one first; "deq" M = 1 was tuned already:
        deq = deq[:7]  # its best tiles, (1, 32, 8, 2, 4, 3) the last of them
        out = [c for pair in zip(fact, deq) for c in pair] + fact[len(deq):] + deq[len(fact):]
        stream = [(1, n, g, v, w, st, "stream") for n, g, w, v, st in STREAM_TILES] if "stream" in variants else []
        dp4a = [(1, n, g, 0, w, st, "dp4a") for n, g, w, st in DP4A_TILES] if "dp4a" in variants else []
        return dp4a + stream + out
    dp4a = ([(bucket, n, g, 0, w, st, v) for n, g, w, st in DP4A_ROWS_TILES for v in ("dp4a", "dp4a_late")
             if v in variants] if bucket <= 16 else [])
    return dp4a + deq[:3] + fact[:2] + deq[3:] + fact[2:]  # M = 8: two "fact" tiles early (an L2-bound guess)


def tolerance(args, config) -> float:
    """The largest relative error a config may show against the reference (a config or its text)."""
    return args.dp4a_tolerance if "dp4a" in str(config) else args.tolerance


def graph_us(calls, repeats: int) -> float:
    """Microseconds per call: all calls captured in one CUDA graph (launch gaps as served,
    each call's weights cold in L2 as the copies cycle), replayed `repeats` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:  # warm: compile and allocate outside the capture
            c()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    us = CLOCK.median(graph.replay, 1, repeats) * 1e3 / len(calls)
    del graph
    return us


class Layer:
    """One (bits, N, K) shape: weight copies that overflow L2 (`copies` of them: 1 for the
    correctness-only check), a bias and the reference per M."""

    def __init__(self, bits: int, n: int, k: int, gen: torch.Generator, device: str = "cuda", copies: int = 0,
                 offset: bool = True):
        w = torch.randn(n, k, device=device, generator=gen) * 0.02
        q = quantize(w, f"int{bits}")
        if not offset:  # GGUF Q4_0: w = scale * (q - 8), no offset
            q = type(q)(bits, q.qweight, q.scale, None)
        self.q = [q]
        self.nbytes = q.nbytes
        copies = copies or max(2, math.ceil(COLD_BYTES / self.nbytes))
        self.q += [type(q)(bits, q.qweight.clone(), q.scale.clone(), None if q.offset is None else q.offset.clone())
                   for _ in range(copies - 1)]
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float16  # fp16: the interpreter's numpy
        self.ref_w = q.dequantize(self.dtype)
        self.bias = (torch.randn(n, device=device, generator=gen) * 0.1).to(self.dtype)
        self.gen, self.n, self.k, self.x, self.ref, self.device = gen, n, k, {}, {}, device

    def inputs(self, m: int):
        if m not in self.x:
            self.x[m] = torch.randn(m, self.k, device=self.device, generator=self.gen).to(self.dtype)
            self.ref[m] = F.linear(self.x[m].float(), self.ref_w.float(), self.bias.float())
        return self.x[m], self.ref[m]

    def error(self, m: int, config, round_w: bool = True) -> float:
        """Max difference from the reference (weights rounded to x's dtype, fp32 products) over
        its max: what tools/bench_quant.py's kernel check reports."""
        x, ref = self.inputs(m)
        got = quant_kernels.gemv(x, self.q[0], self.bias, config, round_w).float()
        return ((got - ref).abs().max() / ref.abs().max()).item()

    def gemv_us(self, m: int, config, repeats: int, round_w: bool = True) -> float:
        x, _ = self.inputs(m)
        return graph_us([lambda q=q: quant_kernels.gemv(x, q, self.bias, config, round_w) for q in self.q], repeats)

    def dense_us(self, m: int, repeats: int) -> float:
        """The prefill path: dequantize kernel, then cuBLAS."""
        x, _ = self.inputs(m)
        return graph_us([lambda q=q: F.linear(x, quant_kernels.dequantize(q, x.dtype), self.bias) for q in self.q],
                        repeats)

    def moved_bytes(self, m: int) -> int:
        return self.nbytes + 2 * m * (self.k + self.n)


def _first_line(e: Exception) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def _env() -> dict:
    import triton

    gpu = "CPU (Triton interpreter)"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name}, {props.multi_processor_count} SMs"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def check_only(args) -> dict:
    """Every variant's first configs against the reference on tiny shapes, nothing timed (the
    CPU run, under TRITON_INTERPRET=1): int8, int4 with offset (Q4_1) and without (Q4_0)."""
    t0 = time.perf_counter()
    res = {"env": _env(), "mode": "check", "shapes": [list(sh) for sh in args.check_shapes], "checks": {},
           "failed": []}
    gen = torch.Generator().manual_seed(0)
    layers = [(f"int{bits}" + ("" if off else "-q4_0"), Layer(bits, n, k, gen, "cpu", 1, off))
              for bits, off in ((8, True), (4, True), (4, False)) for n, k in args.check_shapes]
    worst: dict = {}
    for m in args.ms:
        cands = candidates(m, args.variants)
        per_variant: dict = {}
        for c in cands:  # the first few of each variant
            v = quant_kernels.variant(c)
            if len(per_variant.setdefault(v, [])) < args.check_configs:
                per_variant[v].append(c)
        for v, configs in per_variant.items():
            for config in configs:
                for name, layer in layers:
                    key = f"{name}/{layer.n}x{layer.k}/m{m}/{list(config)}"
                    try:
                        res["checks"][key] = layer.error(m, config)
                        worst[v] = max(worst.get(v, 0.0), res["checks"][key])
                    except Exception as e:
                        res["failed"].append({"check": key, "error": _first_line(e)})
    bad = {k: v for k, v in res["checks"].items() if not v <= tolerance(args, k.rsplit("/", 1)[1])}
    res["max_error"] = worst
    res["ok"] = not bad and not res["failed"]
    res["bad"] = bad
    res["seconds"] = time.perf_counter() - t0
    print(f"checked {len(res['checks'])} (variant, config, shape, M) against the reference: max error "
          f"{res['max_error']}, {len(bad)} over their tolerance ({args.tolerance}; dp4a {args.dp4a_tolerance}), "
          f"{len(res['failed'])} failed")
    return res


def tune(args) -> dict:
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    res = {"env": _env(), "mode": "tune", "shapes": [list(sh) for sh in args.shapes], "buckets": list(args.ms),
           "results": {}, "failed": []}
    bw = copy_bandwidth(torch.device("cuda"), CLOCK, 1 << 30) / 1e9
    res["copy_GBps"] = bw
    log(f"{res['env']['gpu']}: copy bandwidth {bw:.0f} GB/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = {bits: [Layer(bits, n, k, gen) for n, k in args.shapes] for bits in args.bits}
    log("weights ready")

    todo = {(bits, m): candidates(m, args.variants)[:args.max_configs] for bits in args.bits for m in args.ms}
    scores: dict = {key: {} for key in todo}
    errors: dict = {key: {} for key in todo}

    def measure(bits, m, config):
        errs = [layer.error(m, config) for layer in layers[bits]]
        errors[(bits, m)][config] = max(errs)
        if max(errs) > tolerance(args, config):
            raise AssertionError(f"max relative error {max(errs):.2e} > {tolerance(args, config)}")
        return [layer.gemv_us(m, config, args.repeats) for layer in layers[bits]]

    def attempt(bits, m, config):
        try:
            scores[(bits, m)][config] = measure(bits, m, config)
        except Exception as e:  # a config that does not compile, runs out of resources or is wrong
            res["failed"].append({"bits": bits, "m": m, "config": list(config), "error": _first_line(e)})
            log(f"int{bits} M={m} {config}: FAILED {_first_line(e)}")

    # every M = 1 candidate first (the decode that matters most), then round robin over the
    # other buckets: rank 0 of every bucket, then rank 1, ... until the deadline
    order = [key for key in todo if key[1] == 1] + [key for key in todo if key[1] != 1]
    for key in order:
        if key[1] == 1:
            for config in todo[key]:
                if time.perf_counter() < deadline:
                    attempt(*key, config)
    for rank in range(max((len(c) for c in todo.values()), default=0)):
        for key in order:
            if key[1] != 1 and rank < len(todo[key]) and time.perf_counter() < deadline:
                attempt(*key, todo[key][rank])
    if time.perf_counter() > deadline:
        log(f"budget of {args.budget_s:.0f} s reached: later-ranked configs untried")

    def summary(bits, m, config, per) -> dict:
        out = {"config": list(config), "us": sum(per), "error": errors[(bits, m)].get(config), "shapes": {
            f"{layer.n}x{layer.k}": {"us": us, "GBps": layer.moved_bytes(m) / us / 1e3,
                                     "of_copy": layer.moved_bytes(m) / us / 1e3 / bw}
            for layer, us in zip(layers[bits], per)}}
        out["GBps"] = sum(layer.moved_bytes(m) for layer in layers[bits]) / out["us"] / 1e3
        out["of_copy"] = out["GBps"] / bw
        return out

    for (bits, m), tried in scores.items():
        entry: dict = {"tried": len(tried), "max_error": max(errors[(bits, m)].values(), default=None)}
        best = None
        if tried:
            best = min(tried, key=lambda c: sum(tried[c]))
            entry.update(summary(bits, m, best, tried[best]))
            entry["ranking"] = sorted(([list(c), sum(t)] for c, t in tried.items()), key=lambda r: r[1])[:40]
            entry["by_shape"] = {}  # each shape's own best config (GEMV_SHAPE_CONFIGS)
            for i, layer in enumerate(layers[bits]):
                ranked = sorted(tried, key=lambda c: tried[c][i])
                entry["by_shape"][f"{layer.n}x{layer.k}"] = {
                    "config": list(ranked[0]), "us": tried[ranked[0]][i],
                    "ranking": [[list(c), tried[c][i]] for c in ranked[:10]]}
            entry["variants"] = {}
            for v in quant_kernels.VARIANTS:
                mine = {c: t for c, t in tried.items() if quant_kernels.variant(c) == v}
                if mine:
                    vbest = min(mine, key=lambda c: sum(mine[c]))
                    entry["variants"][v] = dict(summary(bits, m, vbest, mine[vbest]), tried=len(mine))
        extras = {"dense_us": (m >= args.dense_from, lambda layer: layer.dense_us(m, args.repeats))}
        deq = entry.get("variants", {}).get("deq")
        if deq and deq["config"][0] == 1:  # what rounding w to bf16 costs the old FMA path (information)
            extras["unrounded_us"] = (True, lambda layer: layer.gemv_us(m, tuple(deq["config"]), args.repeats, False))
        for name, (wanted, fn) in extras.items():
            try:
                if wanted:
                    entry[name] = sum(fn(layer) for layer in layers[bits])
            except Exception as e:  # keep the sweep's results
                entry[name + "_error"] = _first_line(e)
        res["results"][f"int{bits}/{m}"] = entry
        vs = "; ".join(f"{v} {e['config']} {e['us']:.1f} us = {e['of_copy']:.2f} of copy"
                       for v, e in entry.get("variants", {}).items())
        log(f"int{bits} M={m}: " + (f"best {entry['config']} {entry['us']:.1f} us over the shapes, "
                                     f"{entry['GBps']:.0f} GB/s = {entry['of_copy']:.2f} of copy ({vs})" if tried
                                     else "nothing measured")
            + (f"; dequantize+cuBLAS {entry['dense_us']:.1f} us" if "dense_us" in entry else "")
            + (f"; deq without rounding w {entry['unrounded_us']:.1f} us" if "unrounded_us" in entry else ""))
    res["seconds"] = time.perf_counter() - t0
    log("done")
    return res


def table_from(res: dict, base: dict | None = None) -> dict:
    """{(bits, bucket): config or None}: None where dequantize + cuBLAS beat the best GEMV, and
    every bucket above it (a larger batch only favours the GEMM more).  `base` (the table in
    force): its entries for buckets this result did not measure are kept."""
    table, dense_from = dict(base or {}), {}
    for key, e in sorted(res["results"].items(), key=lambda kv: (kv[0].split("/")[0], int(kv[0].split("/")[1]))):
        bits, m = int(key.split("/")[0][3:]), int(key.split("/")[1])
        dense = bits in dense_from or "config" not in e or e.get("dense_us", math.inf) < e["us"]
        if dense:
            dense_from.setdefault(bits, m)
        table[(bits, m)] = None if dense else tuple(e["config"])
    for (bits, m) in list(table):  # a kept entry above a measured crossover follows it
        if bits in dense_from and m > dense_from[bits]:
            table[(bits, m)] = None
    return dict(sorted(table.items()))


def shape_table_from(res: dict, base: dict | None = None, gain: float = 0.03) -> dict:
    """{(bits, bucket, N, K): config} for the shapes whose own best config beats their bucket's
    (summed-over-shapes) best on them by more than `gain`; the bucket's config serves the rest.
    `base`'s entries for buckets this result did not measure are kept."""
    out = {key: cfg for key, cfg in (base or {}).items() if f"int{key[0]}/{key[1]}" not in res["results"]}
    for key, e in sorted(res["results"].items()):
        bits, m = int(key.split("/")[0][3:]), int(key.split("/")[1])
        for shape, own in e.get("by_shape", {}).items():
            n, k = (int(v) for v in shape.split("x"))
            if own["config"] != e["config"] and own["us"] < (1 - gain) * e["shapes"][shape]["us"]:
                out[(bits, m, n, k)] = tuple(own["config"])
    return out


def apply(table: dict, res: dict, path: Path = KERNELS, shapes: dict | None = None) -> None:
    """Rewrite GEMV_CONFIGS (and GEMV_SHAPE_CONFIGS) between quant_kernels.py's BEGIN/END TUNED markers."""
    src = path.read_text()
    lines = [f"# Measured by tools/tune_quant.py on {res['env']['gpu']}, {res['env']['date']}, torch "
             f"{res['env']['torch']}, Triton {res['env']['triton']} (best of the grid per bucket,",
             "# summed over 7B layer shapes; None: dequantize + cuBLAS was faster" + (
                 "; " + ", ".join(res["step"]) + ": the fastest whole decode step of the best alone, "
                 "step_rank)." if res.get("step") else ")."), "GEMV_CONFIGS = {"]
    lines += [f"    {key!r}: {cfg!r}," for key, cfg in table.items()] + ["}"]
    lines += ["# (bits, bucket, N, K): a shape whose own best beat its bucket's on it by 3%+" + (
        " (where step_rank ran: shortened the decode step by 0.25%+)" if res.get("step") else ""),
        "GEMV_SHAPE_CONFIGS = {"]
    lines += [f"    {key!r}: {cfg!r}," for key, cfg in (shapes or {}).items()] + ["}"]
    new, n = re.subn(r"(# BEGIN TUNED[^\n]*\n).*?(# END TUNED)", lambda mt: mt.group(1) + "\n".join(lines) + "\n"
                     + mt.group(2), src, flags=re.S)
    if n != 1:
        raise SystemExit(f"{path}: no BEGIN/END TUNED block")
    path.write_text(new)


def decode(args, table: dict, shapes: dict) -> dict:
    """tools/bench_quant.py's run with `table` and `shapes` served (the GEMV configs just tuned)."""
    import bench_quant

    quant_kernels.GEMV_CONFIGS.update(table)
    quant_kernels.GEMV_SHAPE_CONFIGS.clear()
    quant_kernels.GEMV_SHAPE_CONFIGS.update(shapes)
    bargs = args.decode_args.split()
    res = bench_quant.run(bench_quant.parse_args(bargs))
    print(res["table"])
    return res


def step_rank(args, res: dict, table: dict, shapes: dict) -> dict:
    """--step-top N: each format's and bucket's N fastest configs judged again by what they serve, the
    whole decode step of that many rows on the 7B-shaped model (bench_quant's, CUDA graphs, PDL as
    served), in --step-rounds rounds of alternating order; the bucket takes the fastest step (median
    over rounds).  Where the sweep timed dequantize + cuBLAS (--dense-from), that is a candidate too
    (None in the table).
    Then, with --step-shape-top K, each shape in turn: its K fastest configs alone against the bucket's,
    in the step; one that shortens the step by 0.25%+ becomes the shape's GEMV_SHAPE_CONFIGS entry.
    Why: timed alone a GEMV waits for nothing, while in the step each kernel starts under the one
    before (PDL) with its first weights already loaded, so the tile that wins alone need not win there.
    Updates `table` and `shapes` (their entries of a bucket it ranked)."""
    import bench_gpu
    import bench_quant

    bargs = bench_quant.parse_args(["--batches", "1"])
    device = torch.device("cuda")
    out: dict = {}

    def medians(model, m, choices, serve) -> dict:
        times: dict = {c: [] for c in choices}
        for r in range(args.step_rounds):
            for c in choices if r % 2 == 0 else choices[::-1]:
                serve(c)
                times[c].append(bench_gpu.engine_decode_ms(model, m, bargs.decode_prompt, bargs.decode_steps, CLOCK,
                                                           bargs.warmup, bargs.repeats, "graph"))
        return {c: {"step_ms": t, "median_ms": sorted(t)[len(t) // 2]} for c, t in times.items()}

    work, model_dir = bench_quant.scratch_model(bargs, device, print, "hexswarm-tune-step-")
    try:
        for bits in args.bits:
            model = None
            for m in args.ms:
                entry = res["results"].get(f"int{bits}/{m}", {})
                configs = [tuple(c) for c, _ in entry.get("ranking", [])[:args.step_top]]
                configs += [None] if "dense_us" in entry else []
                if len(configs) < 2:
                    continue
                for key in [k for k in shapes if k[:2] == (bits, m)]:
                    del shapes[key]
                quant_kernels.GEMV_SHAPE_CONFIGS.clear()
                quant_kernels.GEMV_SHAPE_CONFIGS.update(shapes)
                if model is None:
                    model = bench_quant.whole_model(model_dir, device, f"int{bits}")
                out[f"int{bits}/{m}"] = step_rank_bucket(args, model, bits, m, entry, configs, table, shapes, medians)
            del model
            bench_quant.release(device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _set_bucket(bits: int, m: int, config) -> None:
    """Serve `config` (None: dequantize + cuBLAS) for (bits, m) in this process."""
    quant_kernels.GEMV_CONFIGS[(bits, m)] = config


def _set_shape(key: tuple, config) -> None:
    """Serve `config` for the (bits, bucket, N, K) shape in this process; None: the bucket's."""
    if config is None:
        quant_kernels.GEMV_SHAPE_CONFIGS.pop(key, None)
    else:
        quant_kernels.GEMV_SHAPE_CONFIGS[key] = config


def step_rank_bucket(args, model, bits: int, m: int, entry: dict, configs: list, table: dict, shapes: dict,
                     medians) -> dict:
    """step_rank for one format and bucket: its configs, then (--step-shape-top) each shape's.
    medians(model, m, choices, serve): step times of each choice, served by serve(choice)."""
    med = medians(model, m, configs, lambda c: _set_bucket(bits, m, c))
    best = min(med, key=lambda c: med[c]["median_ms"])
    table[(bits, m)] = best
    _set_bucket(bits, m, best)
    alone = {tuple(c): u for c, u in entry["ranking"]}
    alone[None] = entry.get("dense_us")
    name = lambda c: list(c) if c else "dequantize+cuBLAS"  # noqa: E731
    out = {"best": list(best) if best else None, "shapes": {},
           "configs": [dict(config=name(c), alone_us=alone[c], **med[c]) for c in configs]}
    print(f"int{bits} M={m}, step ms (median of {args.step_rounds}): "
          + "; ".join(f"{name(c)} {med[c]['median_ms']:.3f}" for c in configs) + f" -> {name(best)}", flush=True)
    if best is None:  # no GEMV serves this bucket: no shape entries either
        return out
    for shape, own in entry.get("by_shape", {}).items() if args.step_shape_top else ():
        n, k = (int(v) for v in shape.split("x"))
        key = (bits, m, n, k)
        choices = [None] + [tuple(c) for c, _ in own.get("ranking", []) if tuple(c) != best][:args.step_shape_top]
        sm = medians(model, m, choices, lambda c: _set_shape(key, c))
        pick = min(choices, key=lambda c: sm[c]["median_ms"])
        if pick is not None and sm[pick]["median_ms"] > (1 - 0.0025) * sm[None]["median_ms"]:
            pick = None
        _set_shape(key, pick)
        if pick is not None:
            shapes[key] = pick
        out["shapes"][shape] = {"pick": list(pick) if pick else None, "configs": [
            dict(config=list(c) if c else "bucket", **sm[c]) for c in choices]}
        print(f"int{bits} M={m} {shape}: " + "; ".join(f"{list(c) if c else 'bucket'} {sm[c]['median_ms']:.3f}"
                                                      for c in choices)
              + f" -> {list(pick) if pick else 'bucket'}", flush=True)
    return out


def step_picks(res: dict, table: dict, shapes: dict) -> None:
    """A saved result's step_rank picks into `table` and `shapes` (over the kernels-alone ones): each
    ranked bucket's config, and its shapes' entries replaced by the step's."""
    for fmt, st in res.get("step", {}).items():
        bits, m = int(fmt.split("/")[0][3:]), int((fmt.split("/") + ["1"])[1])  # "int4/8"; run 28d: "int4"
        table[(bits, m)] = tuple(st["best"]) if st["best"] else None
        for key in [k for k in shapes if k[:2] == (bits, m)]:
            del shapes[key]
        for shape, e in st.get("shapes", {}).items():
            if e["pick"]:
                shapes[(bits, m, *(int(v) for v in shape.split("x")))] = tuple(e["pick"])


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in sh.split("x")) for sh in text.split(",")]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--apply", action="store_true", help="rewrite quant_kernels.py's GEMV_CONFIGS with the result")
    ap.add_argument("--from-json", help="take the result from this file instead of measuring (with --apply)")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop trying configs after this long")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--ms", default=None, help="M buckets to tune (default: all of quant_kernels.M_BUCKETS; "
                                                "on CPU 1,8,16)")
    ap.add_argument("--variants", default=",".join(quant_kernels.VARIANTS), help="kernel variants to try")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--max-configs", type=int, default=100, help="at most this many configs per bucket")
    ap.add_argument("--dense-from", type=int, default=16, help="time dequantize+cuBLAS from this bucket up")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tolerance", type=float, default=1e-2, help="max relative error against the reference")
    ap.add_argument("--dp4a-tolerance", type=float, default=3e-2,
                    help="the same for the dp4a kernel, whose activations are rounded to int8 (DECISIONS.md)")
    ap.add_argument("--step-top", type=int, default=0,
                    help="judge the N fastest configs of each format and bucket by the whole decode step "
                         "(step_rank)")
    ap.add_argument("--step-rounds", type=int, default=3)
    ap.add_argument("--step-shape-top", type=int, default=0,
                    help="then each shape's K fastest configs alone, judged by the step (GEMV_SHAPE_CONFIGS)")
    ap.add_argument("--decode", action="store_true",
                    help="then run tools/bench_quant.py with the tuned table (decode against the floors)")
    ap.add_argument("--decode-args", default="", help="extra bench_quant.py arguments, e.g. '--batches 1'")
    ap.add_argument("--check-shapes", default="40x224,64x256", help="CPU check: (N, K) shapes")
    ap.add_argument("--check-configs", type=int, default=2, help="CPU check: configs per variant and bucket")
    a = ap.parse_args(argv)
    a.bits = [int(b) for b in a.bits.split(",")]
    a.cpu = not torch.cuda.is_available()
    a.ms = [int(m) for m in (a.ms or ("1,8,16" if a.cpu else ",".join(map(str, quant_kernels.M_BUCKETS)))).split(",")]
    a.shapes = _parse_shapes(a.shapes)
    a.check_shapes = _parse_shapes(a.check_shapes)
    a.variants = tuple(a.variants.split(","))
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        table = table_from(res, quant_kernels.GEMV_CONFIGS)
        shapes = shape_table_from(res, quant_kernels.GEMV_SHAPE_CONFIGS)
        step_picks(res, table, shapes)
    elif args.cpu:
        if not quant_kernels.AVAILABLE or os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("no CUDA GPU: run under TRITON_INTERPRET=1 (Triton's CPU interpreter) to check the "
                             "kernels, or on a GPU to tune")
        res = check_only(args)
        if args.decode:  # bench_quant's tiny CPU path is tests/test_bench_tools.py's; nothing to time here
            res["decode"] = {"skipped": "decode timing needs a GPU"}
            print("--decode: skipped without a GPU")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1, default=str))
        if not res["ok"]:
            raise SystemExit(f"kernel check FAILED: {res['bad'] or res['failed']}")
        return res
    else:
        if not quant_kernels.AVAILABLE:
            raise SystemExit("needs Triton")
        res = tune(args)
        table = table_from(res, quant_kernels.GEMV_CONFIGS)
        shapes = shape_table_from(res, quant_kernels.GEMV_SHAPE_CONFIGS)
        if args.step_top:
            res["step"] = step_rank(args, res, table, shapes)
        res["table"] = {f"int{b}/{m}": (list(c) if c else None) for (b, m), c in table.items()}
        res["shape_table"] = {f"int{b}/{m}/{n}x{k}": list(c) for (b, m, n, k), c in shapes.items()}
        if args.json:  # written now and again after --decode: a decode that dies keeps the sweep
            Path(args.json).write_text(json.dumps(res, indent=1, default=str))
        if args.decode:
            try:
                res["decode"] = decode(args, table, shapes)
            except Exception as e:
                res["decode"] = {"error": _first_line(e)}
                print(f"decode FAILED: {_first_line(e)}")
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    print("GEMV_CONFIGS = {" + "".join(f"\n    {k!r}: {v!r}," for k, v in table.items()) + "\n}")
    print("GEMV_SHAPE_CONFIGS = {" + "".join(f"\n    {k!r}: {v!r}," for k, v in shapes.items()) + "\n}")
    if args.apply:
        apply(table, res, shapes=shapes)
        print(f"wrote {KERNELS.relative_to(REPO)}")
    return res


if __name__ == "__main__":
    main()

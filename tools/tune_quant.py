#!/usr/bin/env python
"""Tune the quantized GEMV (hexswarm/model/quant_kernels.py) on one GPU: for int8 and int4,
each M bucket (1, 8, 16, 32, 64 rows), a compact grid of kernel configs on the 7B layer
shapes; every config's output checked against the torch reference; each timed as the sum
over the shapes of a CUDA-graph replay (median of repeats) over enough weight copies that
every call reads its weights from HBM, not L2.  Also times dequantize + cuBLAS (the prefill
path) per bucket: a bucket where that wins gets no GEMV config (the crossover).

Prints and writes (--json) the best config per (bits, bucket) with GB/s achieved against the
device copy bandwidth measured in the same run; --apply rewrites quant_kernels.py's table
(GEMV_CONFIGS) with them.  Needs only torch and triton; meant to take < 4 minutes on an
H100 (--budget-s bounds the sweep; configs are tried best-guess first, round robin over the
buckets, so a cut sweep still covers every bucket).

    PYTHONPATH=$PWD python3 tools/tune_quant.py --json tune.json --apply   # the GPU run
    python3 tools/tune_quant.py --from-json tune.json --apply                 # its table, on any machine
"""

from __future__ import annotations

import argparse
import json
import math
import re
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


def candidates(bucket: int) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, BLOCK_G, WAVES, num_warps, num_stages), best guesses first: each tile
    with split-K to 2 waves, then without, then 4 and 1 waves (those share the first's kernel)."""
    if bucket == 1:
        tiles = [(1, 32, 8, 4), (1, 64, 4, 4), (1, 64, 8, 8), (16, 64, 4, 4), (1, 128, 4, 8), (1, 16, 8, 4),
                 (1, 32, 16, 8), (1, 128, 2, 4), (1, 8, 16, 2)]  # (16, ...): tensor cores with 15 idle rows
    else:
        bms = {8: (16,), 16: (16,), 32: (32, 16), 64: (64, 32)}[bucket]
        # (64, 8) with 4 warps spills registers at BLOCK_M 16 (sm_90 SASS, Triton 3.9): 8 warps there
        tiles = [(bm, n, g, w) for n, g, w in [(64, 4, 4), (64, 8, 8), (128, 4, 8), (32, 8, 4), (128, 8, 8),
                                               (32, 4, 4)] for bm in bms]
    later = {2: 0.0, 0: 0.5, 4: 1.2, 1: 2.4}  # rank offsets of the WAVES values
    ranked = sorted(((i + later[v], (bm, n, g, v, w, 1)) for i, (bm, n, g, w) in enumerate(tiles) for v in later))
    out = [c for _, c in ranked]
    bm, n, g, w = tiles[0]
    out.insert(6, (bm, n, g, 2, w, 3))  # Triton's own pipelining on top of the manual prefetch
    return out


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
    """One (bits, N, K) shape: weight copies that overflow L2, a bias and the reference per M."""

    def __init__(self, bits: int, n: int, k: int, gen: torch.Generator):
        w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        self.q = [quantize(w, f"int{bits}")]
        self.nbytes = self.q[0].nbytes
        copies = max(2, math.ceil(COLD_BYTES / self.nbytes))
        self.q += [type(self.q[0])(bits, self.q[0].qweight.clone(), self.q[0].scale.clone(),
                                   None if self.q[0].offset is None else self.q[0].offset.clone())
                   for _ in range(copies - 1)]
        self.ref_w = self.q[0].dequantize(torch.bfloat16)
        self.bias = (torch.randn(n, device="cuda", generator=gen) * 0.1).to(torch.bfloat16)
        self.gen, self.n, self.k, self.x, self.ref = gen, n, k, {}, {}

    def inputs(self, m: int):
        if m not in self.x:
            self.x[m] = torch.randn(m, self.k, device="cuda", generator=self.gen).to(torch.bfloat16)
            self.ref[m] = F.linear(self.x[m], self.ref_w, self.bias).float()
        return self.x[m], self.ref[m]

    def error(self, m: int, config, round_w: bool = True) -> float:
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


def tune(args) -> dict:
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    props = torch.cuda.get_device_properties(0)
    import triton

    res = {"env": {"gpu": f"{props.name}, {props.multi_processor_count} SMs", "torch": torch.__version__,
                   "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
           "shapes": [list(s) for s in args.shapes], "buckets": list(args.ms), "results": {}, "failed": []}
    bw = copy_bandwidth(torch.device("cuda"), CLOCK, 1 << 30) / 1e9
    res["copy_GBps"] = bw
    log(f"{res['env']['gpu']}: copy bandwidth {bw:.0f} GB/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = {bits: [Layer(bits, n, k, gen) for n, k in args.shapes] for bits in args.bits}
    log("weights ready")

    todo = {(bits, m): candidates(m)[:args.max_configs] for bits in args.bits for m in args.ms}
    scores: dict = {key: {} for key in todo}

    def measure(bits, m, config):
        errs = [layer.error(m, config) for layer in layers[bits]]
        if max(errs) > args.tolerance:
            raise AssertionError(f"max relative error {max(errs):.2e} > {args.tolerance}")
        return [layer.gemv_us(m, config, args.repeats) for layer in layers[bits]]

    # round robin over (bits, bucket): rank 0 of every bucket, then rank 1, ... until the deadline
    for rank in range(max(len(c) for c in todo.values())):
        for (bits, m), configs in todo.items():
            if rank >= len(configs) or time.perf_counter() > deadline:
                continue
            config = configs[rank]
            try:
                scores[(bits, m)][config] = measure(bits, m, config)
            except Exception as e:  # a config that does not compile, runs out of resources or is wrong
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                res["failed"].append({"bits": bits, "m": m, "config": list(config),
                                      "error": f"{type(e).__name__}: {first}"})
                log(f"int{bits} M={m} {config}: FAILED {type(e).__name__}: {first}")
    if time.perf_counter() > deadline:
        log(f"budget of {args.budget_s:.0f} s reached: later-ranked configs untried")

    for (bits, m), tried in scores.items():
        entry: dict = {"tried": len(tried)}
        if tried:
            best = min(tried, key=lambda c: sum(tried[c]))
            per = tried[best]
            entry.update(config=list(best), us=sum(per), shapes={
                f"{layer.n}x{layer.k}": {"us": us, "GBps": layer.moved_bytes(m) / us / 1e3,
                                         "of_copy": layer.moved_bytes(m) / us / 1e3 / bw}
                for layer, us in zip(layers[bits], per)})
            entry["GBps"] = sum(layer.moved_bytes(m) for layer in layers[bits]) / entry["us"] / 1e3
            entry["of_copy"] = entry["GBps"] / bw
            entry["ranking"] = sorted(([list(c), sum(t)] for c, t in tried.items()), key=lambda r: r[1])[:5]
        extras = {"dense_us": (m >= args.dense_from, lambda layer: layer.dense_us(m, args.repeats)),
                  # what rounding w to bf16 costs on the FMA path (information: the rounding is kept)
                  "unrounded_us": (tried and best[0] == 1, lambda layer: layer.gemv_us(m, best, args.repeats, False))}
        for name, (wanted, fn) in extras.items():
            try:
                if wanted:
                    entry[name] = sum(fn(layer) for layer in layers[bits])
            except Exception as e:  # keep the sweep's results
                entry[name + "_error"] = f"{type(e).__name__}: {str(e).strip()[:200]}"
        res["results"][f"int{bits}/{m}"] = entry
        log(f"int{bits} M={m}: " + (f"best {entry.get('config')} {entry['us']:.1f} us over the shapes, "
                                     f"{entry['GBps']:.0f} GB/s = {entry['of_copy']:.2f} of copy" if tried else
                                     "nothing measured")
            + (f"; dequantize+cuBLAS {entry['dense_us']:.1f} us" if "dense_us" in entry else "")
            + (f"; without rounding w {entry['unrounded_us']:.1f} us" if "unrounded_us" in entry else ""))
    res["table"] = table_from(res)
    res["seconds"] = time.perf_counter() - t0
    log("done")
    return res


def table_from(res: dict) -> dict:
    """{(bits, bucket): config or None}: None where dequantize + cuBLAS beat the best GEMV, and
    every bucket above it (a larger batch only favours the GEMM more)."""
    table, dense_from = {}, {}
    for key, e in sorted(res["results"].items(), key=lambda kv: (kv[0].split("/")[0], int(kv[0].split("/")[1]))):
        bits, m = int(key.split("/")[0][3:]), int(key.split("/")[1])
        dense = bits in dense_from or "config" not in e or e.get("dense_us", math.inf) < e["us"]
        if dense:
            dense_from.setdefault(bits, m)
        table[(bits, m)] = None if dense else tuple(e["config"])
    return table


def apply(table: dict, res: dict, path: Path = KERNELS) -> None:
    """Rewrite GEMV_CONFIGS between quant_kernels.py's BEGIN/END TUNED markers."""
    src = path.read_text()
    lines = [f"# Measured by tools/tune_quant.py on {res['env']['gpu']}, {res['env']['date']}, torch "
             f"{res['env']['torch']}, Triton {res['env']['triton']} (best of the grid per bucket,",
             "# summed over 7B layer shapes; None: dequantize + cuBLAS was faster).", "GEMV_CONFIGS = {"]
    lines += [f"    {key!r}: {cfg!r}," for key, cfg in table.items()] + ["}"]
    new, n = re.subn(r"(# BEGIN TUNED[^\n]*\n).*?(# END TUNED)", lambda mt: mt.group(1) + "\n".join(lines) + "\n"
                     + mt.group(2), src, flags=re.S)
    if n != 1:
        raise SystemExit(f"{path}: no BEGIN/END TUNED block")
    path.write_text(new)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--apply", action="store_true", help="rewrite quant_kernels.py's GEMV_CONFIGS with the result")
    ap.add_argument("--from-json", help="take the result from this file instead of measuring (with --apply)")
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop trying configs after this long")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--ms", default=",".join(map(str, quant_kernels.M_BUCKETS)), help="M buckets to tune")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--max-configs", type=int, default=100, help="at most this many configs per bucket")
    ap.add_argument("--dense-from", type=int, default=16, help="time dequantize+cuBLAS from this bucket up")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tolerance", type=float, default=1e-2, help="max relative error against the reference")
    a = ap.parse_args(argv)
    a.bits = [int(b) for b in a.bits.split(",")]
    a.ms = [int(m) for m in a.ms.split(",")]
    a.shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        table = table_from(res)
    else:
        if not torch.cuda.is_available() or not quant_kernels.AVAILABLE:
            raise SystemExit("needs a CUDA GPU and Triton")
        res = tune(args)
        table = res.pop("table")
        res["table"] = {f"int{b}/{m}": (list(c) if c else None) for (b, m), c in table.items()}
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
    print("GEMV_CONFIGS = {" + "".join(f"\n    {k!r}: {v!r}," for k, v in table.items()) + "\n}")
    if args.apply:
        apply(table, res)
        print(f"wrote {KERNELS.relative_to(REPO)}")
    return res


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""A/B of the quantized-weight backends on one GPU, in one run: hexswarm's kernels
(quant_kernels.py with its tuned table, as QuantLinear serves them) against gemlite's
(quant_gemlite.py, HEXSWARM_QUANT_BACKEND=gemlite), int8 and int4 (Q4_1), groups of 32.

* kernels: Llama-2-7B layer shapes (fused QKV, o, fused gate+up, down) at M = 1 and 32 rows:
  microseconds per call (CUDA-graph replay over weight copies that overflow L2, as
  tools/tune_quant.py times), bytes moved per second and its fraction of the device copy bandwidth
  measured in the same run, max error against the torch reference (dequantize in fp32, round to
  bf16, F.linear).  gemlite: its default kernel per M (GEMV_REVSPLITK for int4, GEMV_SPLITK for
  int8 at M = 1; GEMM_SPLITK at 32), then while --budget-s lasts the other M = 1 kernel and the
  split-K kernels with gemlite's native bf16 atomics (its Hopper default, faster and less exact;
  we serve fp32 atomics); each autotuned on first call over quant_gemlite.CANDIDATES (the seconds
  that took are reported).
  Also: GGUF Q4_0 (scalar zero point) against the reference, and our conversion against
  gemlite's own GemLiteLinear.pack() (same W_q and scales).
* the configs gemlite's autotune chose, as a gemlite config file (--config-out): commit it as
  hexswarm/model/gemlite_configs/<gpu>.json and serving loads it instead of autotuning.
* decode: the random 7B-shaped checkpoint (tools/bench_gpu.py's maker) loaded per (weights,
  backend), ms per step at --batches (CUDA graphs, bench_gpu's loop) against each one's floor
  (bytes a step reads / copy bandwidth); gemlite's batch-1 kernel per bits: the fastest in the
  kernel section (--m1-kernel auto: gemlite's own choice).

    # on the GPU machine, gemlite carried as a wheel (no network there):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gemlite-0.6.0.post2-py3-none-any.whl
    PYTHONPATH=$PWD:/tmp/site python3 tools/bench_gemlite.py --json $OUT/gemlite.json \
        --config-out $OUT/gemlite-config.json
    python3 tools/bench_gemlite.py --device cpu --tiny   # the code path on CPU (tests; gemlite skipped)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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

from gpu_clock import Clock, copy_bandwidth  # noqa: E402
from hexswarm.model import quant_gemlite, quant_kernels  # noqa: E402
from hexswarm.model.quant import BACKEND_ENV, QuantLinear, quantize  # noqa: E402

SHAPES = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))  # (N, K) as served
COLD_BYTES = 256 << 20  # weight copies per timing: > 5x the H100's 50 MB L2
M1_KERNELS = ("GEMV_REVSPLITK", "GEMV_SPLITK")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and model, few steps (the CPU test)")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--config-out", help="write gemlite's tuned configs here (a gemlite config file)")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--ms", default="1,32", help="rows of x in the kernel section")
    ap.add_argument("--budget-s", type=float, default=120.0,
                    help="after this many seconds of the kernel section, skip the non-default gemlite kernels")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--m1-kernel", default="best", choices=["best", "auto", *M1_KERNELS],
                    help="gemlite's batch-1 kernel in the decode section")
    ap.add_argument("--decode", default="int8,int4", help="weights to decode (bf16 too, if named); '' for none")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--copy-bytes", type=int, default=2 << 30)
    a = ap.parse_args(argv)
    if a.tiny:
        a.shapes, a.ms, a.repeats, a.copy_bytes = "64x256,40x224", "1,3", 1, 8 << 20
        a.decode_prompt, a.decode_steps, a.batches = 8, 2, "1,2" if a.batches == "1,32" else a.batches
    a.shapes = [tuple(int(v) for v in sh.split("x")) for sh in a.shapes.split(",")]
    a.bits = [int(b) for b in a.bits.split(",")]
    a.ms = [int(m) for m in a.ms.split(",")]
    a.decode = [m for m in a.decode.split(",") if m]
    a.batches = [int(b) for b in a.batches.split(",")]
    return a


# ---- kernels -------------------------------------------------------------------------------
class Shape:
    """One (bits, N, K): weight copies (ours, and gemlite's once converted) that overflow L2, a bias,
    x and the reference per M."""

    def __init__(self, bits: int, n: int, k: int, device: torch.device, gen: torch.Generator, offset: bool = True,
                 copies: int = 0):
        w = torch.randn(n, k, device=device, generator=gen) * 0.02
        q = quantize(w, f"int{bits}")
        if not offset:  # GGUF Q4_0: w = scale * (q - 8)
            q = QuantLinear(bits, q.qweight, q.scale, None)
        copies = copies or (max(2, -(-COLD_BYTES // q.nbytes)) if device.type == "cuda" else 1)
        self.q = [q] + [QuantLinear(bits, q.qweight.clone(), q.scale.clone(),
                                    None if q.offset is None else q.offset.clone()) for _ in range(copies - 1)]
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.ref_w = q.dequantize(self.dtype)
        self.bias = (torch.randn(n, device=device, generator=gen) * 0.1).to(self.dtype)
        self.bits, self.n, self.k, self.device, self.gen = bits, n, k, device, gen
        self.x: dict = {}
        self.ref: dict = {}
        self.gl = None

    def gemlite(self):
        if self.gl is None:
            self.gl = [quant_gemlite.GemliteWeight(quant_gemlite.convert(q), self.k, self.n) for q in self.q]
        return self.gl

    def inputs(self, m: int):
        if m not in self.x:
            self.x[m] = torch.randn(m, self.k, device=self.device, generator=self.gen).to(self.dtype)
            self.ref[m] = F.linear(self.x[m].float(), self.ref_w.float(), self.bias.float())
        return self.x[m], self.ref[m]

    def calls(self, m: int, kernel: str | None, gl):
        """One call per weight copy: QuantLinear as served (kernel None) or gemlite's `kernel`;
        "<kernel>+bf16atomics": with gemlite's own default on Hopper, split-K sums added in bf16
        (quant_gemlite turns that off for accuracy: this measures what it costs)."""
        x, _ = self.inputs(m)
        if kernel is None:
            return [lambda q=q: q(x, self.bias) for q in self.q]
        kernel, _, variant = kernel.partition("+")
        if variant == "bf16atomics":
            return [lambda w=w: _with_bf16_atomics(gl, lambda: w.run(gl, x, self.bias, kernel)) for w in self.gemlite()]
        return [lambda w=w: w.run(gl, x, self.bias, kernel) for w in self.gemlite()]

    def error(self, m: int, call) -> float:
        _, ref = self.inputs(m)
        got = call().float()
        return ((got - ref).abs().max() / ref.abs().max()).item()

    def moved_bytes(self, m: int) -> int:
        return self.q[0].nbytes + 2 * m * (self.k + self.n)


def _with_bf16_atomics(gl, fn):
    gl.set_native_atomic_bfp16(True)
    try:
        return fn()
    finally:
        gl.set_native_atomic_bfp16(False)


def time_us(calls, device: torch.device, repeats: int) -> float:
    """Microseconds per call: on a GPU all calls in one CUDA graph (tune_quant.graph_us), else
    the host clock."""
    if device.type == "cuda":
        import tune_quant

        return tune_quant.graph_us(calls, repeats)
    return Clock(device).median(lambda: [c() for c in calls], 0, repeats) * 1e3 / len(calls)


def tuned_config(kernel: str, m: int, n: int, k: int, bits: int) -> dict | None:
    """The config gemlite's autotune chose for this call (its config-file entry), if known."""
    try:
        from gemlite.core import GEMLITE_TRITON_MAPPING, cache_kernel_config
        from gemlite.triton_kernels.utils import get_closest_m

        sig = str((get_closest_m(m), n, k, quant_gemlite.GROUP, 8 if bits == 4 else 1, 100 + bits))
        for kern in GEMLITE_TRITON_MAPPING[kernel].kernel:
            found = cache_kernel_config(kern, 6).get(sig)
            if found:
                return found
    except Exception:
        pass
    return None


def measure(shape: Shape, m: int, kernel: str | None, gl, device, repeats: int) -> dict:
    """Error, first-call seconds (gemlite: autotune + compile) and microseconds of one backend."""
    calls = shape.calls(m, kernel, gl)
    t = time.perf_counter()
    err = shape.error(m, calls[0])
    out = {"first_call_s": time.perf_counter() - t, "error": err}
    out["us"] = time_us(calls, device, repeats)
    if kernel is not None:
        out["config"] = tuned_config(kernel.partition("+")[0], m, shape.n, shape.k, shape.bits)
    return out


def summarize(per_shape: dict, shapes: list[Shape], m: int, bw_GBps: float) -> dict:
    for s in shapes:
        e = per_shape[f"{s.n}x{s.k}"]
        e["of_copy"] = s.moved_bytes(m) / e["us"] / 1e3 / bw_GBps
    us = sum(v["us"] for v in per_shape.values())
    moved = sum(s.moved_bytes(m) for s in shapes)
    return {"us": us, "GBps": moved / us / 1e3, "of_copy": moved / us / 1e3 / bw_GBps,
            "max_error": max(v["error"] for v in per_shape.values()),
            "first_call_s": sum(v.get("first_call_s", 0.0) for v in per_shape.values()), "shapes": per_shape}


def kernels(args, device, bw_GBps: float, gl, log, served_done=lambda: None) -> dict:
    """Per (bits, M): hexswarm as served and each gemlite kernel, summed over the shapes.
    served_done() runs once every configuration that can be served has been tuned, before the
    bf16-atomics rows (their autotune results share the served ones' config-file entries)."""
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(0)
    out: dict = {}
    shapes = {bits: [Shape(bits, n, k, device, gen) for n, k in args.shapes] for bits in args.bits}
    log("weights ready")
    plan = []  # (tier, bits, m, kernel): 0 ours and gemlite's default, 1 the other M = 1 kernel, 2 bf16 atomics
    for bits in args.bits:
        for m in args.ms:
            plan.append((0, bits, m, None))
            if gl is not None and m <= quant_gemlite.MAX_ROWS:
                from gemlite.core import get_matmul_type

                default = get_matmul_type(m, bits)
                plan.append((0, bits, m, default))
                if m == 1:
                    plan += [(1, bits, m, kern) for kern in M1_KERNELS if kern != default]
                if default in ("GEMV_REVSPLITK", "GEMM_SPLITK"):  # the kernels that add partial sums atomically
                    plan.append((2, bits, m, default + "+bf16atomics"))
    plan.sort(key=lambda p: p[0])
    done = False
    for tier, bits, m, kernel in plan:
        if tier == 2 and not done:
            served_done()
            done = True
        name = "hexswarm" if kernel is None else f"gemlite/{kernel}"
        if tier and time.perf_counter() - t0 > args.budget_s:
            out.setdefault(f"int{bits}/m{m}", {})[name] = {"skipped": f"--budget-s {args.budget_s:.0f} reached"}
            continue
        per_shape, failed = {}, None
        for s in shapes[bits]:
            try:
                per_shape[f"{s.n}x{s.k}"] = measure(s, m, kernel, gl, device, args.repeats)
            except Exception as e:  # a kernel that fails to compile or run: report it, go on
                failed = f"{s.n}x{s.k}: {type(e).__name__}: {str(e).strip()[:300]}"
                break
        entry = {"failed": failed} if failed else summarize(per_shape, shapes[bits], m, bw_GBps)
        if kernel is not None and gl is not None:
            from gemlite.core import get_matmul_type

            entry["gemlite_default"] = kernel.partition("+")[0] == get_matmul_type(m, bits)
        out.setdefault(f"int{bits}/m{m}", {})[name] = entry
        log(f"int{bits} M={m} {name}: " + (f"FAILED {failed}" if failed else
                                            f"{entry['us']:.1f} us = {entry['of_copy']:.2f} of copy, error "
                                            f"{entry['max_error']:.1e}, first calls {entry['first_call_s']:.1f} s"))
    if not done:
        served_done()
    del shapes
    return out


def q4_0_check(args, device, gl) -> dict:
    """GGUF Q4_0 (w = scale * (q - 8): gemlite's scalar zero point) against the reference."""
    gen = torch.Generator(device=device).manual_seed(1)
    n, k = args.shapes[1 % len(args.shapes)]
    s = Shape(4, n, k, device, gen, offset=False, copies=1)
    out = {}
    from gemlite.core import get_matmul_type

    for m in args.ms:
        if m <= quant_gemlite.MAX_ROWS:
            kern = get_matmul_type(m, 4)
            try:
                out[f"{n}x{k}/m{m}/{kern}"] = s.error(m, s.calls(m, kern, gl)[0])
            except Exception as e:
                out[f"{n}x{k}/m{m}/{kern}"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
    return out


def pack_check(args, device) -> dict:
    """Our conversion against gemlite's own GemLiteLinear.pack() from the unpacked codes: the
    same W_q and scales (the zeros differ by design: pack() derives them from an HQQ zero point)."""
    from gemlite import DType, GemLiteLinear

    from hexswarm.model.quant import unpack_int4

    n, k = args.shapes[0]
    w = torch.randn(n, k, device=device) * 0.02
    out = {}
    for bits in (8, 4):
        q = quantize(w, f"int{bits}")
        ours = quant_gemlite.convert(q)
        lin = GemLiteLinear(bits, group_size=quant_gemlite.GROUP, in_features=k, out_features=n,
                            input_dtype=DType.BF16, output_dtype=DType.BF16)
        codes = q.qweight if bits == 8 else unpack_int4(q.qweight)
        lin.pack(codes, q.scale, None if bits == 8 else q.offset, None)
        out[f"int{bits}"] = {"W_q": bool(torch.equal(lin.W_q, ours["W_q"])),
                             "scales": bool(torch.equal(lin.scales, ours["scales"][:k // quant_gemlite.GROUP]))}
    return out


def gemlite_configs(path: Path) -> int:
    """Write the configs gemlite's autotune chose in this process as a gemlite config file."""
    from gemlite.core import GEMLITE_TRITON_MAPPING, cache_kernel_config

    found: dict = {}
    for name, kind in GEMLITE_TRITON_MAPPING.items():
        for kern in kind.kernel:
            found.setdefault(name, {}).update(cache_kernel_config(kern, 6))
    found = {k: v for k, v in found.items() if v}
    path.write_text(json.dumps(found, indent=1))
    return sum(len(v) for v in found.values())


# ---- decode --------------------------------------------------------------------------------
def decode(args, device, bw: float, m1: dict, log) -> dict:
    """ms per decode step per (weights, backend, batch) against each one's floor."""
    import bench_quant

    out: dict = {"ms": {}, "floor_ms": {}, "bytes": {}, "gemlite_layers": {}, "m1_kernel": m1}
    work = None
    try:
        work, model_dir = bench_quant.scratch_model(args, device, log, "hexswarm-bench-gemlite-")
        clock = Clock(device)
        runs = [(mode, b) for mode in args.decode for b in (("-",) if mode == "bf16" else ("hexswarm", "gemlite"))]
        for mode, backend in runs:
            os.environ[BACKEND_ENV] = "hexswarm" if backend == "-" else backend
            quant_gemlite.M1_KERNEL.update(m1 if backend == "gemlite" else {})
            t = time.perf_counter()
            model = bench_quant.whole_model(model_dir, device, mode)
            key = mode if backend == "-" else f"{mode}/{backend}"
            nbytes = bench_quant.streamed_bytes(model)
            out["bytes"][key] = nbytes
            out["gemlite_layers"][key] = sum(isinstance(m, QuantLinear) and m.gemlite is not None
                                             for m in model.modules())
            log(f"{key}: loaded in {time.perf_counter() - t:.1f} s, {nbytes / 2**30:.2f} GiB per step, "
                f"{out['gemlite_layers'][key]} layers on gemlite")
            timed = bench_quant.time_decode(model, key, args.batches, args, clock, nbytes / bw * 1e3, 1, 3, log)
            out["ms"].update(timed)
            out["floor_ms"].update({k: nbytes / bw * 1e3 for k in timed})
            del model
            bench_quant.release(device)
    finally:
        os.environ.pop(BACKEND_ENV, None)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return out


def best_m1(kernel_res: dict, choice: str) -> dict:
    """gemlite's batch-1 kernel per bits for the decode section."""
    if choice == "auto":
        return {8: None, 4: None}
    if choice != "best":
        return {8: choice, 4: choice}
    out = {}
    for bits in (8, 4):
        timed = {name.split("/", 1)[1]: e["us"] for name, e in kernel_res.get(f"int{bits}/m1", {}).items()
                 if name.startswith("gemlite/") and "+" not in name and "us" in e}  # served: fp32 atomics
        out[bits] = min(timed, key=timed.get) if timed else None
    return out


# ---- report --------------------------------------------------------------------------------
def table(res: dict) -> str:
    lines = ["| weights | M | backend / kernel | us (sum of shapes) | of copy bandwidth | max error | first calls s |",
             "|---|---|---|---|---|---|---|"]
    for key, entries in res.get("kernels", {}).items():
        bits, m = key.split("/")
        for name, e in entries.items():
            if "us" in e:
                lines.append(f"| {bits} | {m[1:]} | {name} | {e['us']:.1f} | {e['of_copy']:.2f} | {e['max_error']:.1e} "
                             f"| {e['first_call_s']:.1f} |")
            else:
                lines.append(f"| {bits} | {m[1:]} | {name} | {e.get('failed') or e.get('skipped')} | | | |")
    dec = res.get("decode", {})
    if dec.get("ms"):
        lines += ["", "| weights / backend | batch | ms/step | floor ms | measured / floor |", "|---|---|---|---|---|"]
        for key, ms in dec["ms"].items():
            name, batch = key.rsplit("/", 1)
            floor = dec["floor_ms"][key]
            lines.append(f"| {name} | {batch} | {ms:.3f} | {floor:.3f} | {ms / floor:.2f} |")
    return "\n".join(lines)


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    res: dict = {"env": _env(device), "args": {k: v for k, v in vars(args).items()}}
    bw = copy_bandwidth(device, Clock(device), args.copy_bytes)
    res["copy_GBps"] = bw / 1e9
    log(f"{res['env']['gpu']}: copy bandwidth {bw / 1e9:.0f} GB/s")
    gl = quant_gemlite.load() if device.type == "cuda" else None
    res["gemlite"] = {"version": getattr(gl, "__version__", None), "failure": quant_gemlite.FAILURE,
                      "candidates": {k: len(v) for k, v in quant_gemlite.CANDIDATES.items()}}
    if gl is not None:
        gl.reset_config()  # autotune afresh for these shapes (over CANDIDATES), not from a loaded file
    else:
        log(f"gemlite not usable here ({quant_gemlite.FAILURE or 'needs a CUDA device'}): hexswarm only")

    def write_configs():
        if gl is not None and args.config_out:
            res["configs_written"] = gemlite_configs(Path(args.config_out))
            log(f"gemlite configs: {res['configs_written']} entries -> {args.config_out}")

    res["kernels"] = kernels(args, device, bw / 1e9, gl, log, write_configs)
    if gl is not None:
        checks = (("q4_0", lambda: q4_0_check(args, device, gl)), ("pack_check", lambda: pack_check(args, device)))
        for name, fn in checks:
            try:
                res[name] = fn()
            except Exception as e:
                res[name] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
            log(f"{name}: {res[name]}")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.json:  # now too: a run cut short in the decode section keeps the kernel numbers
        Path(args.json).write_text(json.dumps(dict(res, table=table(res)), indent=1, default=str))
    if args.decode:
        m1 = best_m1(res["kernels"], args.m1_kernel)
        log(f"decode with gemlite's batch-1 kernel per bits: {m1}")
        res["decode"] = decode(args, device, bw, m1, log)
    res["gemlite_fallback"] = quant_gemlite.FAILURE
    res["kernel_fallback"] = quant_kernels.FAILURE
    res["table"] = table(res)
    res["seconds"] = time.perf_counter() - t0
    return res


def _env(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": "CPU"}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = f"{props.name}, {props.multi_processor_count} SMs"
    return env


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = run(args)
    print(res["table"])
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""torch's int4 kernel (tinygemm, model/quant_tinygemm.py) against ours (quant_kernels.py, as QuantLinear
serves it) and bf16 F.linear, on the Llama-2-7B layer shapes (fused QKV, o, fused gate+up, down) at a few
row counts: microseconds per call (CUDA-graph replay over weight copies that overflow L2, as
tools/bench_gemlite.py times), the sum over the four shapes, its fraction of the copy bandwidth measured
in the same run, and each one's max error against the torch reference (dequantize in fp32, F.linear).
tinygemm at each of its K tilings (2, 4, 8).  It picks MAX_ROWS and INNER_K_TILES in quant_tinygemm.py.

    python tools/bench_tinygemm.py --json tinygemm.json        # on the GPU
    python tools/bench_tinygemm.py --device cpu --tiny         # the code path on CPU (torch's CPU twin)
    python tools/bench_tinygemm.py --device cpu --tiny --agree-steps 64   # + SmolLM2's greedy agreement
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_gemlite  # noqa: E402
from gpu_clock import Clock, copy_bandwidth  # noqa: E402
from hexswarm.model import quant_tinygemm  # noqa: E402

TILES = (2, 4, 8)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="small shapes, one repeat (the CPU test)")
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--agree-steps", type=int, default=0,
                    help="also: SmolLM2's Q4_1 layers served by tinygemm (bf16) teacher-forced on the dense bf16 "
                         "model's greedy tokens for this many steps (bench_quant.greedy_agreement; `make model`)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    a.shapes = ((64, 256), (40 * 8, 256)) if a.tiny else bench_gemlite.SHAPES
    a.repeats = 1 if a.tiny else a.repeats
    return a


def measure(args) -> dict:
    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    bw = copy_bandwidth(dev, Clock(dev), (8 << 20) if args.tiny else (1 << 30)) / 1e9
    res: dict = {"copy_GBps": bw, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "torch": torch.__version__, "rows": {}}
    for m in (int(r) for r in args.rows.split(",")):
        per: dict = {}
        for n, k in args.shapes:
            shape = bench_gemlite.Shape(4, n, k, dev, gen)
            x, ref = shape.inputs(m)
            ref = ref - shape.bias.float()  # tinygemm has no bias: every path is timed without one
            xb = x.to(torch.bfloat16)  # tinygemm takes bf16 only (x is float32 on a CPU)
            line = {}
            for name, calls in [("ours", [lambda q=q: q(x) for q in shape.q])] + [
                    (f"tinygemm/{t}", [lambda w=quant_tinygemm.convert(q, t): w(xb, None) for q in shape.q])
                    for t in TILES]:
                got = calls[0]().float()
                line[name] = {"us": bench_gemlite.time_us(calls, dev, args.repeats),
                              "error": ((got - ref).abs().max() / ref.abs().max()).item()}
            dense = [shape.ref_w.clone() for _ in range(len(shape.q))]
            line["bf16"] = {"us": bench_gemlite.time_us([lambda w=w: F.linear(x, w) for w in dense], dev, args.repeats)}
            per[f"{n}x{k}"] = line
            for name, v in line.items():  # bytes read and written: weights, x and y
                v["moved"] = 2 * n * k + 2 * m * (n + k) if name == "bf16" else shape.moved_bytes(m)
            del shape, dense
        total = {name: sum(line[name]["us"] for line in per.values()) for name in next(iter(per.values()))}
        moved = {name: sum(line[name]["moved"] for line in per.values()) for name in total}
        res["rows"][m] = {"shapes": per, "total_us": total,
                          "of_copy": {name: moved[name] / total[name] / 1e3 / bw for name in total}}
        print(f"rows {m}: " + ", ".join(f"{name} {us:.1f} us ({res['rows'][m]['of_copy'][name]:.2f} of copy)"
                                         for name, us in total.items()), flush=True)
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = measure(args)
    if args.agree_steps:
        from bench_quant import greedy_agreement
        from hexswarm.model.smollm2 import smollm2_path

        res["smollm2"] = greedy_agreement(smollm2_path(), torch.device(args.device), args.agree_steps, tinygemm=True)
        print(f"SmolLM2 Q4_1 by tinygemm vs dense bf16: {res['smollm2']['agree']}/{args.agree_steps} greedy steps "
              f"agree ({res['smollm2']['tinygemm_layers']} of {res['smollm2']['packed_layers']} layers by tinygemm)",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""On a CUDA machine: the engine's CUDA path (fast kernels, CUDA graphs through the executor) against
its CPU float32 path on the same random checkpoints, for several layouts; and decode speed with graphs.

    python tools/gpu_check.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hexswarm.model.tiny import TinySpec, make_tiny_llama  # noqa: E402
from hexswarm.runtime.offline import GenerateJob, generate  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    report = {"device": torch.cuda.get_device_name(0), "checks": []}
    ok = True
    specs = {"gqa": TinySpec(layers=4, hidden=64, heads=4, kv_heads=2, seed=1),
             "llama3": TinySpec(layers=4, hidden=64, heads=4, kv_heads=1, head_dim=16, llama3_rope=True,
                                tie_embeddings=True, seed=2),
             "wide": TinySpec(layers=8, hidden=1024, heads=16, kv_heads=8, intermediate=2816, vocab=512, seed=3,
                              max_positions=1024)}
    for name, spec in specs.items():
        d = make_tiny_llama(work / name, spec)
        cpu = generate(GenerateJob(str(d), "Once upon a time", max_new_tokens=24, return_logits=True))
        for hc, pp in ([], []), ([1, 1], [spec.layers // 2, spec.layers - spec.layers // 2]):
            for dtype in ("float32", "bfloat16"):
                g = generate(GenerateJob(str(d), "Once upon a time", hc, pp, max_new_tokens=24, device="cuda",
                                         dtype=dtype, return_logits=True))
                rel = float((g["logits"].cpu() - cpu["logits"]).abs().max() / cpu["logits"].abs().max())
                same = g["tokens"] == cpu["tokens"]
                first_diff = next((i for i, (x, y) in enumerate(zip(g["tokens"], cpu["tokens"])) if x != y), None)
                check = {"model": name, "layout": [hc, pp], "dtype": dtype, "tokens_equal": same,
                         "first_divergence": first_diff, "logits_rel_err": rel,
                         "decode_ms_per_token": g["timings"]["decode_ms_per_token"]}
                if dtype == "float32":
                    ok &= same and rel < 1e-4
                report["checks"].append(check)
                print(json.dumps(check), flush=True)
    return write_report(report, ok, a.out)


def write_report(report: dict, ok: bool, out: str | None) -> int:
    """Record the verdict (and the report at `out`); the exit code of a check tool."""
    report["ok"] = ok
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""What a serving node measures about itself at start (hexswarm/swarm/calibrate.py), run alone.

    python tools/calibrate_node.py --model-dir DIR [--device cuda] [--dtype auto] [--data-dir D] [--json CAL.json]

The same call a node makes (``calibrate.cached_measure``: kernels, then the runtime's own two-stage
engines and local link), so the numbers are the ones a node would gossip.  Without --data-dir the
cache is a fresh temporary directory (a new measurement).  CAL.json is the calibration in its wire
form (plan/calibration.py), which ``tools/plan_vs_measured.py --calibration CAL.json`` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hexswarm.model.source import model_fingerprint  # noqa: E402
from hexswarm.plan.calibration import parse_calibration  # noqa: E402
from hexswarm.swarm import calibrate  # noqa: E402


def summary(cal: dict) -> str:
    c = parse_calibration(cal)
    lines = [f"device {c.device}, dtype {c.dtype}, {c.layers} layers measured",
             "decode " + ", ".join(f"B{b} {t * 1e3:.3f} ms" for b, t in c.decode) + f" (context {c.context})",
             f"prefill one prompt of {c.prompt}: {c.prefill_s * 1e3:.2f} ms ({c.prefill_tokens_per_s:,.0f} tokens/s)"]
    if c.prefill_batch:
        n, s = c.prefill_batch
        lines.append(f"prefill {n} tokens in one forward: {s * 1e3:.2f} ms ({n / s:,.0f} tokens/s)")
    if c.mixed:
        r, n, s = c.mixed
        lines.append(f"{r} decode rows + a prompt of {n} tokens in one step: {s * 1e3:.2f} ms")
    if c.stage_overhead:
        lines.append("host time per stage per step " + ", ".join(f"B{r} {t * 1e3:.3f} ms" for r, t in c.stage_overhead))
    if c.stage_host:
        lines.append("host time per stage per step, GPU time in " + ", ".join(f"B{r} {t * 1e3:.3f} ms" for r, t in c.stage_host))
    if c.link_Bps:
        lines.append(f"local link {c.link_Bps / 1e9:.2f} GB/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on cuda, float32 on cpu (as a node serves)")
    ap.add_argument("--data-dir", type=Path, help="the node's cache directory (default: a fresh temporary one)")
    ap.add_argument("--json", type=Path, help="write the calibration here")
    args = ap.parse_args(argv)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if args.device == "cuda" else "float32")
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="hexswarm-calibrate-"))
    start = time.perf_counter()
    cal = calibrate.cached_measure(data_dir, args.model_dir, model_fingerprint(args.model_dir), args.device, dtype)
    print(summary(cal))
    print(f"({time.perf_counter() - start:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(cal, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

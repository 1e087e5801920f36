#!/usr/bin/env python3
"""`hexswarm generate` on the CPU across layouts: decode ms per token, for comparing codes on one machine.

Writes a random-weight model of the given shape (default 8 layers, hidden 1024) once, then runs `python -m hexswarm
generate --json` for each layout from this checkout (or --code DIR, a folder holding another `hexswarm` package)
and prints decode ms/token and the tokens' equality with the first layout's.

    CUDA_VISIBLE_DEVICES= python3 tools/bench_generate_cpu.py [--code DIR] [--layouts "1/8;2/8;2,2/4,4;4/8"]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", default=str(ROOT), help="folder holding the hexswarm package to run")
    ap.add_argument("--model-dir", default="/dev/shm/hexswarm-generate-cpu")
    ap.add_argument("--layouts", default="1/8;2/8;2,2/4,4;4/8", help="TP/layers per stage, ';' between layouts")
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    model = Path(a.model_dir)
    if not (model / "config.json").exists():
        from hexswarm.model.tiny import TinySpec, make_tiny_llama

        make_tiny_llama(model, TinySpec(layers=8, hidden=1024, heads=16, kv_heads=8, intermediate=2816))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([a.code, os.environ.get("PYTHONPATH", "")])}
    first = None
    for layout in a.layouts.split(";"):
        tp, layers = layout.split("/")
        cmd = [sys.executable, "-m", "hexswarm", "generate", "--model", str(model), "--prompt", "Once upon a time",
               "--max-new-tokens", str(a.new_tokens), "--json", "--hetero-config", *tp.split(","),
               "--pp-partition", *layers.split(",")]
        p = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True, timeout=600)
        if p.returncode:
            print(f"{layout}: rc {p.returncode}: {p.stderr.strip()[-300:]}")
            continue
        out = json.loads(p.stdout)
        first = first or out["tokens"]
        print(f"{layout}: decode {out['timings']['decode_ms_per_token']} ms/token, load {out['timings']['load_s']} s, "
              f"tokens {'same' if out['tokens'] == first else 'DIFFERENT'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

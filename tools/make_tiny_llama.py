#!/usr/bin/env python3
"""Write a random-weight HF Llama checkpoint (config, safetensors, tokenizer.json) in seconds.

    python tools/make_tiny_llama.py OUT_DIR [--layers N --hidden H --heads A --kv-heads K --vocab V --seed S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hexswarm.model.tiny import TinySpec, make_tiny_llama  # noqa: E402


def main() -> None:
    d = TinySpec()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=d.layers)
    ap.add_argument("--hidden", type=int, default=d.hidden)
    ap.add_argument("--heads", type=int, default=d.heads)
    ap.add_argument("--kv-heads", type=int, default=d.kv_heads)
    ap.add_argument("--intermediate", type=int, default=d.intermediate)
    ap.add_argument("--vocab", type=int, default=d.vocab)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--max-positions", type=int, default=d.max_positions)
    ap.add_argument("--llama3-rope", action="store_true", help="Llama-3 rope scaling")
    ap.add_argument("--tie-embeddings", action="store_true")
    ap.add_argument("--attention-bias", action="store_true")
    ap.add_argument("--mlp-bias", action="store_true")
    ap.add_argument("--shards", type=int, default=1, help="split weights over N files with an index")
    ap.add_argument("--bin", action="store_true", help="write pytorch_model*.bin instead of safetensors")
    ap.add_argument("--seed", type=int, default=d.seed)
    a = ap.parse_args()
    spec = TinySpec(
        layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, intermediate=a.intermediate,
        vocab=a.vocab, head_dim=a.head_dim, llama3_rope=a.llama3_rope, tie_embeddings=a.tie_embeddings,
        attention_bias=a.attention_bias, mlp_bias=a.mlp_bias, max_positions=a.max_positions,
        seed=a.seed, shards=a.shards, bin_format=a.bin,
    )
    print(make_tiny_llama(a.out_dir, spec))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""On a CUDA machine: the engine's CUDA path (fast kernels, CUDA graphs through the executor) against
its CPU float32 path on the same random checkpoints, for several layouts; and decode speed with graphs.

    python tools/gpu_check.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import itertools
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
    for dtype, quant in ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "int8"),
                         (torch.bfloat16, "int4")):
        check = mixed_graph_check(work / "wide", dtype, quant)
        ok &= check["max_rel_err"] < (1e-4 if dtype == torch.float32 else 2e-2)
        report["checks"].append(check)
        print(json.dumps(check), flush=True)
    return write_report(report, ok, a.out)


@torch.inference_mode()
def mixed_graph_check(model_dir: Path, dtype: torch.dtype, quant: str | None = None) -> dict:
    """A step of decode rows and prompt chunks replayed from a mixed CUDA graph against the same step
    run eagerly, then a decode step (its decode graph) over what each wrote to the KV cache (whole
    stage, and the last of two stages fed hidden states); `quant` (int8, int4): the projections
    quantized, as a quantized stage serves them."""
    from hexswarm.model.config import LlamaConfig
    from hexswarm.model.quant import quantize
    from hexswarm.model.shard import TensorShard
    from hexswarm.model.stage import StageModel, StagePart

    cfg = LlamaConfig.from_dir(model_dir)
    gen = torch.Generator().manual_seed(5)
    prefill = [(0, 0, 5), (1, 0, 7), (2, 0, 9)]
    step = [(0, 5, 1), (1, 7, 1), (2, 9, 1), (3, 0, 70), (4, 0, 3)]  # decode rows, then two prompts
    after = [(s, p + n, 1) for s, p, n in step]
    errs = []
    for first in (True, False):
        part = StagePart(0, cfg.num_hidden_layers, TensorShard.for_rank(cfg, 1, 0), with_embedding=first,
                         with_head=True)
        model = StageModel(cfg, part, dtype, torch.device("cuda"))
        for prm in model.parameters():
            prm.copy_((torch.randn(prm.shape, generator=gen) * 0.05).to(prm.dtype))
        for layer in model.layers if quant else ():
            for name in layer.PROJECTIONS:
                # as a stage serves them: in the backend HEXSWARM_QUANT_BACKEND names (quant.for_backend)
                layer.set_projection(name, quantize(getattr(layer, name).data, quant).for_backend())
        n_in = [sum(n for _, _, n in rows) for rows in (prefill, step, after)]
        feeds = [torch.randint(0, cfg.vocab_size, (n,), generator=gen) if first
                 else torch.randn(n, cfg.hidden_size, generator=gen).to(dtype) for n in n_in]
        outs = {}
        for mode in ("eager", "graph"):
            kv = model.new_kv_cache(8, 256)
            runner = model.step_graphs(kv)
            res = []
            for rows, feed in zip((prefill, step, after), feeds):
                x = feed.cuda()
                got = runner.run(x, rows) if mode == "graph" and rows is not prefill else None
                if got is not None:  # the mixed graph of `step`, the decode graph of `after`
                    res.append(got.clone())
                    continue
                h = model.forward_rows(model.embed(x) if first else x, kv, rows)
                ends = torch.tensor(list(itertools.accumulate(n for _, _, n in rows)), device="cuda") - 1
                res.append(model.logits(h.index_select(0, ends)))
            outs[mode] = res
        for e, g in zip(outs["eager"], outs["graph"]):
            errs.append(float((e - g).abs().max() / e.abs().max()))
    return {"check": "mixed CUDA graph against eager", "dtype": str(dtype), "quantize": quant, "max_rel_err": max(errs),
            "rel_errs": errs}


def write_report(report: dict, ok: bool, out: str | None) -> int:
    """Record the verdict (and the report at `out`); the exit code of a check tool."""
    report["ok"] = ok
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

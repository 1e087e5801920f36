#!/usr/bin/env python
"""Quantized weights on one GPU: decode speed of bf16, int8 and int4 weights against each
one's memory-bandwidth floor, the kernels against the dequantized reference, and greedy
agreement of SmolLM2 served quantized (its Q4_1 blocks) with the same model dequantized to bf16.

In one run, on the same GPU:

* a random Llama-2-7B-shaped checkpoint (tools/bench_gpu.py's maker), loaded three times:
  bf16, `quantize="int8"`, `quantize="int4"` (converted once at load, on the GPU);
* decode ms/step at batch 1 and 32 (CUDA graphs, bench_gpu's decode loop), and each one's
  floor = bytes of weights a step reads (packed weights + scales for the quantized layers,
  everything but the embedding table) / device copy bandwidth measured in the same run.
  Both batches run the dequantize-inside GEMV kernel with quant_kernels.GEMV_CONFIGS (run
  tools/tune_quant.py --apply first on a new GPU);
* kernel check: GEMV (1, 7, 16, 32, 64 rows, those the table serves by GEMV) and the
  dequantize kernel against the torch reference (dequantize in fp32, round to bf16,
  F.linear) on 7B layer shapes;
* SmolLM2-135M-Instruct (`make model`): 64 greedy steps of the dense-bf16 model, then the
  quantized model teacher-forced on the same tokens: steps whose argmax agrees.

    python tools/bench_quant.py --json quant.json      # the GPU run (meant to take < 4 minutes on an H100)
    python tools/bench_quant.py --device cpu --tiny    # the code path on CPU (tests)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "tools")):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_gpu  # noqa: E402  (the checkpoint maker, the clock, copy bandwidth, the decode loop)

from hexswarm.model.quant import BACKEND_ENV, QuantLinear, quantize  # noqa: E402
from hexswarm.model.shard import TensorShard  # noqa: E402
from hexswarm.model.source import load_config, open_checkpoint  # noqa: E402
from hexswarm.model.stage import StagePart, load_stage  # noqa: E402

MODES = ("bf16", "int8", "int4")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model and few steps (the CPU test)")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the 7B-shaped model")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--agree-steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--copy-bytes", type=int, default=2 << 30)
    ap.add_argument("--int4-backends", default="hexswarm",
                    help="int4 served by each of these (HEXSWARM_QUANT_BACKEND, comma-separated: hexswarm, tinygemm, "
                         "gemlite); rows 'int4+<backend>' beside 'int4'")
    ap.add_argument("--json", help="write every number here")
    a = ap.parse_args(argv)
    if a.tiny:
        a.decode_prompt, a.decode_steps, a.agree_steps = 8, 2, min(a.agree_steps, 4)
        a.batches = "1,2" if a.batches == "1,32" else a.batches
        a.warmup, a.repeats, a.copy_bytes = 0, 1, 8 << 20
    return a


def whole_model(model_dir, device, mode: str):
    cfg = load_config(model_dir)
    part = StagePart(0, cfg.num_hidden_layers, TensorShard.for_rank(cfg, 1, 0), True, True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return load_stage(open_checkpoint(model_dir), cfg, part, dtype, device, quantize=None if mode == "bf16" else mode)


def streamed_bytes(model) -> int:
    """Bytes one decode step reads: dense weights but the embedding table, plus packed layers (one
    layout each: tinygemm's, held beside ours, has as many bytes for an int4 weight with offsets)."""
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "embedding")
    packed = (m.nbytes - (m.tinygemm.nbytes if m.tinygemm is not None else 0)
              for m in model.modules() if isinstance(m, QuantLinear))
    return dense + sum(packed)


def modes(args) -> list[tuple[str, str, str]]:
    """(row key, weights, backend) in the order measured: bf16, int8, int4 (the backend set in the
    environment, else ours), then int4 per further backend."""
    base = os.environ.get(BACKEND_ENV, "") or "hexswarm"
    extra = [b.strip() for b in args.int4_backends.split(",") if b.strip() and b.strip() != base]
    return [(m, m, base) for m in MODES] + [(f"int4+{b}", "int4", b) for b in extra]


@torch.inference_mode()
def kernel_check(device, shapes, dtype) -> dict:
    """Max relative difference of the Triton kernels from the torch reference."""
    from hexswarm.model import quant_kernels

    if device.type != "cuda" or not quant_kernels.AVAILABLE:
        return {"skipped": "needs CUDA and Triton"}
    out = {}
    g = torch.Generator(device=device).manual_seed(0)
    for n, k in shapes:
        w = torch.randn(n, k, device=device, generator=g, dtype=torch.float32) * 0.02
        for mode in ("int8", "int4"):
            q = quantize(w, mode)
            ref_w = q.dequantize(dtype)
            deq = quant_kernels.dequantize(q, dtype)
            out[f"dequant/{mode}/{n}x{k}"] = (deq.float() - ref_w.float()).abs().max().item() / ref_w.float().abs().max().item()
            for m in [m for m in (1, 7, 16, 32, 64) if quant_kernels.gemv_config(q, m)]:
                x = torch.randn(m, k, device=device, generator=g).to(dtype)
                bias = torch.randn(n, device=device, generator=g).to(dtype)
                ref = F.linear(x, ref_w, bias).float()
                got = quant_kernels.gemv(x, q, bias).float()
                out[f"gemv/{mode}/{n}x{k}/m{m}"] = (got - ref).abs().max().item() / ref.abs().max().item()
    return out


@torch.inference_mode()
def greedy_agreement(gguf_file, device, steps: int, tinygemm: bool = False) -> dict:
    """Dense-bf16 SmolLM2 decodes greedily; the quantized one is fed the same tokens.  `tinygemm`: the
    quantized one's int4 layers served by tinygemm (quant_tinygemm.py; both models in bf16, on a CPU too)."""
    from hexswarm.runtime.chat import ChatTemplate
    from hexswarm.runtime.tokenizer import TextTokenizer

    cfg = load_config(gguf_file)
    prompt = ChatTemplate.for_model(gguf_file).render([{"role": "user", "content": "Write a short poem about GPUs."}])
    ids = TextTokenizer(gguf_file, cfg).encode(prompt)
    part = StagePart(0, cfg.num_hidden_layers, TensorShard.for_rank(cfg, 1, 0), True, True)
    dtype = torch.bfloat16 if device.type == "cuda" or tinygemm else torch.float32
    models = {mode: load_stage(open_checkpoint(gguf_file), cfg, part, dtype, device, quantize=mode)
              for mode in ("none", "int4")}  # int4: the file's Q4_1 blocks kept packed (the default on CUDA)
    if tinygemm:
        from hexswarm.model import quant_tinygemm

        for m in models["int4"].modules():
            if isinstance(m, QuantLinear) and quant_tinygemm.fits(m):
                m.to_tinygemm()
    tokens = {}
    for mode, model in models.items():
        kv = model.new_kv_cache(1, len(ids) + steps + 1)
        h = model(model.embed(torch.tensor([ids], device=device)), kv, [0], [0])
        nxt = model.logits(h[:, -1]).argmax(-1)
        runner = model.step_graphs(kv)
        got = [int(nxt)]
        for i in range(steps - 1):
            # teacher forcing: the quantized model continues from the reference's tokens
            feed = torch.tensor([tokens["none"][i] if mode != "none" else got[-1]], device=device)
            got.append(int(runner.step(feed, [0], [len(ids) + i]).argmax(-1)))
        tokens[mode] = got
    agree = sum(a == b for a, b in zip(tokens["none"], tokens["int4"]))
    return {"steps": steps, "agree": agree, "reference_tokens": tokens["none"], "quantized_tokens": tokens["int4"],
            "packed_layers": sum(isinstance(m, QuantLinear) for m in models["int4"].modules()),
            "tinygemm_layers": sum(getattr(m, "tinygemm", None) is not None for m in models["int4"].modules())}


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    clock = bench_gpu.Clock(device)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    from hexswarm.model import pdl

    res: dict = {"env": bench_gpu._env(device), "args": vars(args), "decode": {}, "floor": {}, "bytes": {},
                 "pdl": pdl.enabled(device)}  # programmatic dependent launch (HEXSWARM_PDL)
    bw = bench_gpu.copy_bandwidth(device, clock, args.copy_bytes)
    res["copy_GBps"] = bw / 1e9
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    batches = bench_gpu._csv_ints(args.batches)

    work = None
    measured = modes(args)
    env_backend = os.environ.get(BACKEND_ENV)
    try:
        work, model_dir = scratch_model(args, device, log, "hexswarm-bench-quant-")
        cfg = load_config(model_dir)
        try:
            res["kernels"] = kernel_check(device, [(cfg.hidden_size, cfg.hidden_size),
                                                   (2 * cfg.intermediate_size, cfg.hidden_size),
                                                   (cfg.hidden_size, cfg.intermediate_size)], torch.bfloat16)
        except Exception as e:  # report it and go on: the decode numbers then show the torch fallback
            from hexswarm.model import quant_kernels

            res["kernels"] = {"error": f"{type(e).__name__}: {e}"}
            quant_kernels.disable(e)
        log(f"kernel check: {res['kernels']}")
        for key, mode, backend in measured:
            t = time.perf_counter()
            os.environ[BACKEND_ENV] = backend  # read as each QuantLinear loads (QuantLinear.for_backend)
            model = whole_model(model_dir, device, mode)
            mode = key
            nbytes = streamed_bytes(model)
            res["bytes"][mode] = nbytes
            log(f"{mode}: loaded in {time.perf_counter() - t:.1f} s, {nbytes / 2**30:.2f} GiB read per step")
            timed = time_decode(model, mode, batches, args, clock, nbytes / bw * 1e3, args.warmup, args.repeats, log)
            res["decode"].update(timed)
            res["floor"].update({k: nbytes / bw * 1e3 for k in timed})
            del model
            release(device)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if env_backend is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = env_backend

    from hexswarm.errors import UserError
    from hexswarm.model.smollm2 import smollm2_path

    try:
        res["smollm2"] = greedy_agreement(smollm2_path(), device, args.agree_steps)
        log(f"SmolLM2 Q4_1 vs dequantized bf16: {res['smollm2']['agree']}/{args.agree_steps} greedy steps agree")
    except UserError as e:
        res["smollm2"] = {"skipped": str(e)}
    from hexswarm.model import quant_kernels

    res["kernel_fallback"] = quant_kernels.FAILURE  # None: the Triton kernels ran throughout
    res["table"] = table(res, [k for k, _, _ in measured], batches)
    return res


def table(res: dict, keys: list[str], batches: list[int]) -> str:
    lines = ["| weights | batch | ms/step | floor ms | floor / measured | GiB per step |", "|---|---|---|---|---|---|"]
    for mode in keys:
        for B in batches:
            ms, floor = res["decode"][f"{mode}/{B}"], res["floor"][f"{mode}/{B}"]
            lines.append(f"| {mode} | {B} | {ms:.3f} | {floor:.3f} | {floor / ms:.2f} | {res['bytes'][mode] / 2**30:.2f} |")
    return "\n".join(lines)




def time_decode(model, key: str, batches, args, clock, floor_ms: float, warmup: int, repeats: int, log) -> dict:
    """{f"{key}/{B}": ms per decode step} at each batch (CUDA graphs), each logged against floor_ms."""
    out = {}
    for B in batches:
        ms = bench_gpu.engine_decode_ms(model, B, args.decode_prompt, args.decode_steps, clock, warmup, repeats, "graph")
        out[f"{key}/{B}"] = ms
        log(f"{key} batch {B}: {ms:.3f} ms/step (floor {floor_ms:.3f}, x{ms / floor_ms:.2f})")
    return out


def release(device) -> None:
    """Give a deleted model's memory back before the next one loads."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

def scratch_model(args, device, log, prefix: str) -> tuple[Path, Path]:
    """(a folder to remove afterwards, a checkpoint in it): the tiny model (--tiny), else the random
    7B-shaped one with --layers layers in a scratch folder (bench_gpu's maker)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    if args.tiny:
        from hexswarm.model.tiny import TinySpec, make_tiny_llama

        return work, make_tiny_llama(work / "tiny", TinySpec(layers=2, hidden=64, heads=4, kv_heads=2,
                                                             intermediate=128, max_positions=256))
    shutil.rmtree(work)
    model_dir = bench_gpu._scratch_dir(int(13.5e9 * (args.layers + 1) / 33))
    bench_gpu.make_llama_checkpoint(model_dir, args.layers, device)
    log(f"checkpoint: {args.layers} layers")
    return model_dir, model_dir

def main(argv=None) -> dict:
    args = parse_args(argv)
    res = run(args)
    print(res["table"])
    k = res.get("kernels", {})
    if k and not ({"skipped", "error"} & set(k)):
        print(f"kernels vs reference: max relative difference {max(k.values()):.2e}")
    elif "error" in k:
        print(f"kernels FAILED: {k['error']}")
    if res.get("kernel_fallback"):
        print(f"quantized rows used the torch fallback: {res['kernel_fallback']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()

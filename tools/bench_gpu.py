#!/usr/bin/env python
"""hexswarm's engine against transformers and the memory-bandwidth floor, on one GPU.

Builds a random-weight Llama-2-7B-shaped HF checkpoint on the machine (no
download: weights are drawn on the GPU in bf16 and written as safetensors),
then measures in one run, with CUDA events, after warm-up, the median of
repeats:

* prefill latency (batch 1 and 8, 512 tokens, through the last token's logits);
* decode ms/token and tokens/s at batch 1, 8 and 32 (prompt of --decode-prompt
  tokens, then --decode-steps greedy steps, argmax on the GPU feeding the next
  step), for hexswarm's engine (CUDA graphs; the same kernels launched eagerly;
  the plain-torch reference path), for transformers `generate` (eager and sdpa
  attention; ms/token = (t(generate N+1) - t(generate 1)) / N) and the floor:
  bytes of weights a step must read (everything but the embedding table, which
  is gathered) over a measured device-to-device copy bandwidth (bytes read +
  written per second).  A second floor adds the KV cache a step reads.

`--device cpu --tiny` runs the same code on a tiny model (tests use it; the
numbers mean nothing there).

    python tools/bench_gpu.py --json out.json            # the GPU run
    python tools/bench_gpu.py --device cpu --tiny        # the code path, on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from hexswarm.model.checkpoint import CheckpointReader  # noqa: E402
from hexswarm.model.config import LlamaConfig  # noqa: E402
from hexswarm.model.shard import TensorShard  # noqa: E402
from hexswarm.model.stage import StagePart, load_stage  # noqa: E402

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


# ---- the checkpoint --------------------------------------------------------------------

def _layer_shapes(cfg: dict, i: int) -> dict[str, tuple[tuple[int, ...], float]]:
    """name -> (shape, std) of layer i; std ~ 1/sqrt(fan_in) as in hexswarm.model.tiny."""
    H, F = cfg["hidden_size"], cfg["intermediate_size"]
    hd = H // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": ((H,), 0.1),
        p + "post_attention_layernorm.weight": ((H,), 0.1),
        p + "self_attn.q_proj.weight": ((q, H), 2 / math.sqrt(H)),
        p + "self_attn.k_proj.weight": ((kv, H), 2 / math.sqrt(H)),
        p + "self_attn.v_proj.weight": ((kv, H), 1 / math.sqrt(H)),
        p + "self_attn.o_proj.weight": ((H, q), 1 / math.sqrt(q)),
        p + "mlp.gate_proj.weight": ((F, H), 1 / math.sqrt(H)),
        p + "mlp.up_proj.weight": ((F, H), 1 / math.sqrt(H)),
        p + "mlp.down_proj.weight": ((H, F), 1 / math.sqrt(F)),
    }


def make_llama_checkpoint(out: Path, layers: int, device: torch.device, files: int = 4, seed: int = 0) -> Path:
    """A random Llama-2-7B-shaped checkpoint (bf16 safetensors, sharded with an index).

    Weights are drawn on `device` (fast on a GPU) file by file; writing one file
    overlaps drawing the next."""
    from safetensors.torch import save_file

    cfg = dict(LLAMA2_7B, num_hidden_layers=layers)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    specs: dict[str, tuple[tuple[int, ...], float]] = {"model.embed_tokens.weight": ((V, H), 1.0)}
    for i in range(layers):
        specs.update(_layer_shapes(cfg, i))
    specs["model.norm.weight"] = ((H,), 0.1)
    specs["lm_head.weight"] = ((V, H), 4 / math.sqrt(H))
    names = list(specs)
    files = max(1, min(files, len(names)))
    groups = [names[i * len(names) // files:(i + 1) * len(names) // files] for i in range(files)]
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for gi, group in enumerate(groups):
            tensors = {}
            for name in group:
                shape, std = specs[name]
                t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
                t = t.mul_(std)
                if name.endswith("norm.weight"):
                    t = t.add_(1.0)
                tensors[name] = t.to(torch.bfloat16).cpu()
                total += t.numel() * 2
            fname = f"model-{gi + 1:05d}-of-{files:05d}.safetensors"
            weight_map.update({n: fname for n in group})
            pending.append(pool.submit(save_file, tensors, str(out / fname), {"format": "pt"}))
            while len(pending) > 1:  # at most two files in host memory
                pending.pop(0).result()
        for p in pending:
            p.result()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    return out


def _scratch_dir(need_bytes: int) -> Path:
    """/dev/shm when it has room (no disk writes), else the temp dir."""
    for base in ("/dev/shm", tempfile.gettempdir()):
        try:
            if shutil.disk_usage(base).free > need_bytes * 1.15:
                return Path(tempfile.mkdtemp(prefix="hexswarm-bench-", dir=base))
        except OSError:
            continue
    return Path(tempfile.mkdtemp(prefix="hexswarm-bench-"))


# ---- timing ----------------------------------------------------------------------------

# Clock and copy_bandwidth live in gpu_clock.py (torch only, for tune_quant.py); bench_serve and
# bench_quant take them from here
from gpu_clock import Clock, copy_bandwidth  # noqa: E402,F401


# ---- hexswarm's engine -----------------------------------------------------------------

def load_engine(model_dir: Path, device: torch.device, dtype: torch.dtype):
    cfg = LlamaConfig.from_dir(model_dir)
    part = StagePart(0, cfg.num_hidden_layers, TensorShard.for_rank(cfg, 1, 0), True, True)
    return load_stage(CheckpointReader(model_dir), cfg, part, dtype, device)


def streamed_weight_bytes(model) -> int:
    """Bytes of weights one forward step reads: all but the embedding table (rows are gathered)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "embedding")


def _ids(B, T, vocab, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g).to(device)


@torch.inference_mode()
def engine_prefill_ms(model, B, T, clock, warmup, repeats, mode) -> float:
    """B prompts of T tokens in one step.  Mode fast runs it as the serving engine does (a CUDA graph
    when one holds the step, else eagerly); torch: the reference path."""
    model.fast_kernels = mode != "torch"
    kv = model.new_kv_cache(B, T)
    ids = _ids(B, T, model.cfg.vocab_size, model.device, 1)
    slots = list(range(B))
    runner = model.step_graphs(kv, use_graphs=mode != "torch")
    rows = [(b, 0, T) for b in slots]

    def run():
        out = runner.run(ids.view(-1), rows) if T > 1 else None
        if out is not None:
            return out
        h = model(model.embed(ids), kv, slots, [0] * B)
        return model.logits(h[:, -1])

    ms = clock.median(run, warmup, repeats)
    del runner, kv
    return ms


@torch.inference_mode()
def engine_decode_ms(model, B, P, N, clock, warmup, repeats, mode) -> float:
    """ms per decode step: mode graph (CUDA graphs), eager (same kernels, no graph), torch (reference path)."""
    model.fast_kernels = mode != "torch"
    kv = model.new_kv_cache(B, P + N)
    ids = _ids(B, P, model.cfg.vocab_size, model.device, 2)
    slots = list(range(B))
    runner = model.step_graphs(kv, use_graphs=mode == "graph")
    h = model(model.embed(ids), kv, slots, [0] * B)
    first = model.logits(h[:, -1]).argmax(-1)

    def run():
        nxt = first
        for i in range(N):
            nxt = runner.step(nxt, slots, [P + i] * B).argmax(-1)
        return nxt

    ms = clock.median(run, warmup, repeats) / N
    del runner, kv
    return ms


@torch.inference_mode()
def engine_mixed_ms(model, D: int, T: int, P: int, clock, warmup: int, repeats: int) -> dict:
    """A served step's cost: D decode rows at context P plus T prompt tokens (prompts of up to 128),
    replayed from a mixed CUDA graph (T > 0) or a decode graph (T == 0); ms per step."""
    prompts = [min(128, T - i) for i in range(0, T, 128)]
    kv = model.new_kv_cache(D + len(prompts) + 1, P + 130)
    runner = model.step_graphs(kv)
    if D:
        model(model.embed(_ids(D, P, model.cfg.vocab_size, model.device, 4)), kv, list(range(D)), [0] * D)
    rows = [(b, P, 1) for b in range(D)] + [(D + i, 0, n) for i, n in enumerate(prompts)]
    ids = _ids(1, D + T, model.cfg.vocab_size, model.device, 5).view(-1)
    if not T:
        return clock.median(lambda: runner.step(ids, list(range(D)), [P] * D), warmup, repeats)
    shape = runner.mixed_shape(rows)
    if shape is None:
        raise ValueError(f"no mixed graph holds {D} decode rows and {T} prompt tokens")
    return clock.median(lambda: runner.mixed_step(ids, rows, shape), warmup, repeats)


def capture_seconds(model, slots: int, max_seq_len: int) -> dict:
    """What a server's start-up pays for CUDA graphs at `slots` KV slots: seconds to capture every
    decode bucket, then every mixed-step bucket, and the graph pool's memory."""
    kv = model.new_kv_cache(slots, max_seq_len)
    runner = model.step_graphs(kv)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # capture empties the cache itself: start from an empty one
    base = torch.cuda.memory_reserved()
    t = time.perf_counter()
    runner.capture_all(mixed=False)
    torch.cuda.synchronize()
    decode_s, decode_mem = time.perf_counter() - t, torch.cuda.memory_reserved() - base
    t = time.perf_counter()
    runner.capture_all()
    torch.cuda.synchronize()
    out = {"slots": slots, "decode_graphs": len(runner.buckets), "decode_s": round(decode_s, 2),
           "mixed_graphs": len(runner.mixed_decode) * len(runner.mixed_tokens),
           "mixed_s": round(time.perf_counter() - t, 2), "decode_pool_MiB": decode_mem >> 20,
           "all_pool_MiB": (torch.cuda.memory_reserved() - base) >> 20}
    del runner, kv
    torch.cuda.empty_cache()
    return out


@torch.inference_mode()
def engine_agreement(model, P: int, N: int) -> dict:
    """Fast path (CUDA graphs) against the plain-torch path on the same weights: prefill logits,
    then N greedy steps each fed the reference's token."""
    B = 2
    ids = _ids(B, P, model.cfg.vocab_size, model.device, 3)
    slots = [1, 0]  # non-consecutive order: exercises slot indexing
    res = {}
    for mode in ("torch", "graph"):
        model.fast_kernels = mode != "torch"
        kv = model.new_kv_cache(2, P + N + 1)
        runner = model.step_graphs(kv, use_graphs=mode == "graph")
        h = model(model.embed(ids), kv, slots, [0] * B)
        outs = [model.logits(h[:, -1])]
        feed = res.get("torch_tokens")
        toks = [outs[0].argmax(-1)]
        for i in range(N):
            nxt = feed[i] if feed is not None else toks[-1]
            lg = runner.step(nxt, slots, [P + i] * B).clone()
            outs.append(lg)
            toks.append(lg.argmax(-1))
        res[mode] = torch.stack(outs).float()
        if mode == "torch":
            res["torch_tokens"] = toks
        else:
            res["graph_tokens"] = toks
        del runner, kv
    a, b = res["torch"], res["graph"]
    agree = sum(int(torch.equal(x, y)) for x, y in zip(res["torch_tokens"], res["graph_tokens"]))
    model.fast_kernels = True
    return {
        "max_rel_logit_diff": float((a - b).abs().max() / a.abs().max()),
        "per_step_rel_diff": [round(float((x - y).abs().max() / x.abs().max()), 4) for x, y in zip(a, b)],
        "argmax_agree_steps": f"{agree}/{N + 1}",
        "prefill_logits": res["torch"][0].cpu(),
        "prompt": ids.cpu(),
    }


@torch.inference_mode()
def engine_profile(model, B: int, P: int, steps: int = 3) -> str:
    """Kernel times of a few eagerly launched fast-path decode steps (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    model.fast_kernels = True
    kv = model.new_kv_cache(B, P + steps + 3)
    slots = list(range(B))
    runner = model.step_graphs(kv, use_graphs=False)
    model(model.embed(_ids(B, P, model.cfg.vocab_size, model.device, 4)), kv, slots, [0] * B)
    nxt = torch.full((B,), 5, dtype=torch.long, device=model.device)
    for i in range(2):
        runner.step(nxt, slots, [P + i] * B)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            runner.step(nxt, slots, [P + 2 + i] * B)
        torch.cuda.synchronize()
    del runner, kv
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)


def kernel_selfcheck(device: torch.device) -> dict:
    """The fast path against the torch path on small random models in float32 and bfloat16
    (float32: the kernels' indexing and arithmetic, to rounding; bfloat16: the noise level)."""
    from hexswarm.model.tiny import TinySpec, make_tiny_llama

    specs = {
        "gqa": TinySpec(layers=3, hidden=256, heads=8, kv_heads=2, intermediate=512, vocab=384, seed=1),
        "mha_bias": TinySpec(layers=3, hidden=256, heads=4, kv_heads=4, intermediate=512, vocab=384,
                             attention_bias=True, mlp_bias=True, seed=3),
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in specs.items():
            d = make_tiny_llama(Path(tmp) / name, spec)
            for dt in (torch.float32, torch.bfloat16):
                m = load_engine(d, device, dt)
                r = engine_agreement(m, 40, 6)
                out[f"{name}/{str(dt)[6:]}"] = {k: r[k] for k in ("max_rel_logit_diff", "argmax_agree_steps")}
                del m
    return out


# ---- transformers ----------------------------------------------------------------------

def load_hf(model_dir: Path, device: torch.device, dtype: torch.dtype, impl: str):
    from transformers import LlamaForCausalLM

    if device.type == "cuda":
        try:  # straight to the GPU
            return LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=impl,
                                                    device_map=str(device)).eval()
        except Exception:  # noqa: BLE001 - no accelerate, or an older transformers
            pass
    m = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=impl)
    return m.to(device).eval()


def hf_set_impl(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers
        model.config._attn_implementation = impl


@torch.inference_mode()
def hf_prefill_ms(model, B, T, clock, warmup, repeats) -> float:
    ids = _ids(B, T, model.config.vocab_size, model.device, 1)

    def run():
        try:
            return model(input_ids=ids, logits_to_keep=1, use_cache=True).logits
        except TypeError:
            return model(input_ids=ids, use_cache=True).logits

    return clock.median(run, warmup, repeats)


@torch.inference_mode()
def hf_decode_ms(model, B, P, N, clock, warmup, repeats) -> float:
    ids = _ids(B, P, model.config.vocab_size, model.device, 2)
    mask = torch.ones_like(ids)

    def gen(n):
        return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0)

    t_full = clock.median(gen(N + 1), warmup, repeats)
    t_one = clock.median(gen(1), warmup, repeats)
    return (t_full - t_one) / N


@torch.inference_mode()
def hf_prefill_logits(model, prompt: torch.Tensor) -> torch.Tensor:
    return model(input_ids=prompt.to(model.device)).logits[:, -1].float().cpu()


# ---- the run ---------------------------------------------------------------------------

def _csv_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model (the CPU test)")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the 7B-shaped model")
    ap.add_argument("--model-dir", help="reuse this checkpoint instead of making one")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint made for the run")
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--prefill-batches", default="1,8")
    ap.add_argument("--decode-batches", default="1,8,32")
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--hf-decode-steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hf-repeats", type=int, default=3)
    ap.add_argument("--modes", default="graph,eager,torch", help="engine decode modes")
    ap.add_argument("--hf", default="eager,sdpa", help="transformers attention implementations ('' skips)")
    ap.add_argument("--mixed", default="", help="D:T pairs: a graph step of D decode rows and T prompt tokens "
                    "(e.g. 32:0,32:128,64:256)")
    ap.add_argument("--capture", default="", help="slot counts: time capturing every CUDA graph a server captures")
    ap.add_argument("--copy-bytes", type=int, default=2 << 30)
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--hf-child", help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    ap.add_argument("--no-cudnn-sdpa", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", default="1,32", help="batch sizes to profile a few eager decode steps of (CUDA; '' skips)")
    a = ap.parse_args(argv)
    if a.tiny:  # small enough for a CPU test
        a.prefill_len = min(a.prefill_len, 16)
        a.decode_prompt = min(a.decode_prompt, 8)
        a.decode_steps = min(a.decode_steps, 3)
        a.hf_decode_steps = min(a.hf_decode_steps, 2)
        a.prefill_batches = "1,2" if a.prefill_batches == "1,8" else a.prefill_batches
        a.decode_batches = "1,2" if a.decode_batches == "1,8,32" else a.decode_batches
        a.warmup, a.repeats, a.hf_repeats = min(a.warmup, 1), min(a.repeats, 2), min(a.hf_repeats, 1)
        a.copy_bytes = min(a.copy_bytes, 8 << 20)
    return a


def _env(device: torch.device) -> dict:
    import hexswarm.model.attention as attn

    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flash_attn": attn.HAVE_FLASH_ATTN,
        "attention": attn.backend_name(device),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except Exception:
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
    return env


_CUDNN_PROBE = """
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
for B in (1, 8):
    q, k, v = (torch.randn(B, 512, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.cuda.synchronize()
print("ok")
"""


def cudnn_sdpa_works() -> str | None:
    """Run SDPA's cuDNN backend at the prefill shapes in a child process (a fault there is
    sticky: it would end this process's CUDA context).  None if it works, else the error."""
    import subprocess

    try:
        r = subprocess.run([sys.executable, "-c", _CUDNN_PROBE], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return "probe timed out"
    if r.returncode == 0 and "ok" in r.stdout:
        return None
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"exit {r.returncode}"


def _guard(results: dict, key: str, fn):
    """Run one measurement; a failure is recorded, not fatal (the rest of the run still counts)."""
    try:
        results[key] = fn()
    except Exception as e:  # noqa: BLE001
        results[key] = None
        results.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"
        print(f"!! {key}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    clock = Clock(device)
    res: dict = {"env": _env(device), "args": vars(args)}
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    if device.type == "cuda":
        err = cudnn_sdpa_works()
        if err is None:
            res["env"]["cudnn_sdpa"] = "works"
        else:
            res["env"]["cudnn_sdpa"] = f"fails in a fresh process: {err}"
        log(f"SDPA cuDNN backend: {res['env']['cudnn_sdpa']}")

    made = None
    if args.model_dir:
        model_dir = Path(args.model_dir)
    elif args.tiny:
        from hexswarm.model.tiny import TinySpec, make_tiny_llama

        made = model_dir = Path(tempfile.mkdtemp(prefix="hexswarm-bench-tiny-"))
        make_tiny_llama(model_dir, TinySpec(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128,
                                            max_positions=256))
    else:
        need = int(13.5e9 * (args.layers + 1) / 33)
        made = model_dir = _scratch_dir(need)
        t = time.perf_counter()
        make_llama_checkpoint(model_dir, args.layers, device)
        res["checkpoint_s"] = round(time.perf_counter() - t, 1)
        log(f"checkpoint: {args.layers} layers in {model_dir} ({res['checkpoint_s']} s)")
    try:
        return _measure(args, res, model_dir, device, dtype, clock, log)
    finally:
        if made is not None and not args.keep:
            shutil.rmtree(made, ignore_errors=True)


def _measure(args, res, model_dir, device, dtype, clock, log) -> dict:
    cfg = LlamaConfig.from_dir(model_dir)
    res["model"] = {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
                    "dtype": str(dtype).replace("torch.", "")}
    res["copy_bw_GBps"] = copy_bandwidth(device, clock, args.copy_bytes) / 1e9
    log(f"device-to-device copy: {res['copy_bw_GBps']:.0f} GB/s (read + write)")

    t = time.perf_counter()
    model = load_engine(model_dir, device, dtype)
    res["engine_load_s"] = round(time.perf_counter() - t, 1)
    wbytes = streamed_weight_bytes(model)
    res["weight_bytes"] = wbytes
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * model.lm_head.element_size()
    P, N = args.decode_prompt, args.decode_steps
    mean_ctx = P + (N + 1) / 2
    floors = {}
    for B in _csv_ints(args.decode_batches):
        floors[B] = {"weights_ms": wbytes / (res["copy_bw_GBps"] * 1e9) * 1e3,
                     "weights_kv_ms": (wbytes + B * mean_ctx * kv_per_token) / (res["copy_bw_GBps"] * 1e9) * 1e3}
    res["floor"] = floors
    log(f"engine loaded in {res['engine_load_s']} s; weights streamed per step {wbytes / 1e9:.2f} GB")

    if device.type == "cuda":
        _guard(res, "selfcheck", lambda: kernel_selfcheck(device))
        log(f"fast path vs torch path on small models: {res.get('selfcheck')}")
    modes = [m for m in args.modes.split(",") if m]
    _guard(res, "agreement", lambda: engine_agreement(model, min(64, args.prefill_len), 8))
    hf_prompt = res["agreement"].pop("prompt") if res.get("agreement") else None
    engine_logits = res["agreement"].pop("prefill_logits") if res.get("agreement") else None
    if res.get("agreement"):
        log(f"fast path vs torch path: {res['agreement']}")

    res["prefill"] = {}
    for B in _csv_ints(args.prefill_batches):
        for mode in ("fast", "torch") if "torch" in modes else ("fast",):
            _guard(res["prefill"], f"engine-{mode}/{B}", lambda: engine_prefill_ms(
                model, B, args.prefill_len, clock, args.warmup, args.repeats, mode))
            log(f"engine prefill {mode} B={B} T={args.prefill_len}: {res['prefill'].get(f'engine-{mode}/{B}')} ms")
    res["decode"] = {}
    for B in _csv_ints(args.decode_batches):
        for mode in modes:
            _guard(res["decode"], f"engine-{mode}/{B}", lambda: engine_decode_ms(
                model, B, P, N, clock, args.warmup if mode != "torch" else 1, args.repeats, mode))
            log(f"engine decode {mode} B={B}: {res['decode'].get(f'engine-{mode}/{B}')} ms/token")
    if device.type == "cuda" and args.capture:
        for slots in _csv_ints(args.capture):
            _guard(res, f"capture/{slots}", lambda: capture_seconds(model, slots, 384))
            log(f"CUDA graph capture at {slots} slots: {res.get(f'capture/{slots}')}")
    if device.type == "cuda" and args.mixed:
        res["mixed"] = {}
        for pair in args.mixed.split(","):
            D, T = (int(v) for v in pair.split(":"))
            _guard(res["mixed"], pair, lambda: engine_mixed_ms(model, D, T, P + N // 2, clock, args.warmup,
                                                                 args.repeats))
            log(f"engine mixed step, {D} decode rows + {T} prompt tokens: {res['mixed'].get(pair)} ms")
    if device.type == "cuda":
        for B in _csv_ints(args.profile):
            _guard(res, f"profile/{B}", lambda: engine_profile(model, B, P))
            if res.get(f"profile/{B}"):
                log(f"kernel times, 3 eager decode steps, batch {B}:\n{res[f'profile/{B}']}")
    model.fast_kernels = True
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    impls = [i for i in args.hf.split(",") if i]
    ref_file = None
    if engine_logits is not None:
        ref_file = Path(tempfile.mkdtemp(prefix="hexswarm-bench-ref-")) / "ref.pt"
        torch.save({"prompt": hf_prompt, "logits": engine_logits}, ref_file)
    for impl in impls:
        # transformers runs in a child process: a fresh CUDA context with its default SDPA
        # backends, and a fault there cannot take the engine's numbers with it
        child = run_hf_child(args, model_dir, impl, ref_file, log)
        for attempt in ("default", "cudnn-off"):
            if attempt == "cudnn-off":
                if child.get("ok") or args.device != "cuda":
                    break
                log(f"!! transformers {impl} child failed ({child.get('error')}); again without SDPA's cuDNN backend")
                res.setdefault("errors", {})[f"hf-{impl}-default-backends"] = child.get("error")
                child = run_hf_child(args, model_dir, impl, ref_file, log, no_cudnn=True)
                child["sdpa_backends"] = "cuDNN off (default faulted)"
        if not child.get("ok"):
            res.setdefault("errors", {})[f"hf-{impl}"] = child.get("error")
            continue
        res["prefill"].update(child["prefill"])
        res["decode"].update(child["decode"])
        for k in ("hf_load_s", f"hf_vs_engine_rel_diff/{impl}", "sdpa_backends"):
            if k in child:
                res[f"{k}/{impl}" if k in ("hf_load_s", "sdpa_backends") else k] = child[k]
        res.setdefault("errors", {}).update(child.get("errors", {}))
        if not res["errors"]:
            del res["errors"]
    res["table"] = table(res, args, impls, modes)
    return res


def run_hf_child(args, model_dir: Path, impl: str, ref_file, log, no_cudnn: bool = False) -> dict:
    import subprocess

    out = Path(tempfile.mkdtemp(prefix="hexswarm-bench-hf-")) / "hf.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-child", impl, "--model-dir", str(model_dir),
           "--device", args.device, "--json", str(out), "--prefill-len", str(args.prefill_len),
           "--prefill-batches", args.prefill_batches, "--decode-batches", args.decode_batches,
           "--decode-prompt", str(args.decode_prompt), "--hf-decode-steps", str(args.hf_decode_steps),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--hf-repeats", str(args.hf_repeats)]
    if ref_file is not None:
        cmd += ["--ref", str(ref_file)]
    if no_cudnn:
        cmd.append("--no-cudnn-sdpa")
    r = subprocess.run(cmd, stdout=None, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0 or not out.is_file():
        lines = [ln for ln in (r.stderr or "").strip().splitlines() if ln.strip()]
        return {"ok": False, "error": (lines[-1][:300] if lines else f"exit {r.returncode}")}
    d = json.loads(out.read_text())
    d["ok"] = True
    return d


def hf_child_main(args) -> None:
    """One transformers attention implementation, measured in this (child) process."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    clock = Clock(device)
    impl, P = args.hf_child, args.decode_prompt
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    res: dict = {"prefill": {}, "decode": {}}
    t = time.perf_counter()
    hf = load_hf(Path(args.model_dir), device, dtype, impl)
    res["hf_load_s"] = round(time.perf_counter() - t, 1)
    log(f"transformers ({impl}) loaded in {res['hf_load_s']} s")
    if args.ref:
        ref = torch.load(args.ref)
        got = hf_prefill_logits(hf, ref["prompt"])
        res[f"hf_vs_engine_rel_diff/{impl}"] = float((got - ref["logits"]).abs().max() / got.abs().max())
    for B in _csv_ints(args.prefill_batches):
        _guard(res["prefill"], f"hf-{impl}/{B}", lambda: hf_prefill_ms(
            hf, B, args.prefill_len, clock, args.warmup, args.repeats))
        log(f"transformers {impl} prefill B={B}: {res['prefill'].get(f'hf-{impl}/{B}')} ms")
    for B in _csv_ints(args.decode_batches):
        _guard(res["decode"], f"hf-{impl}/{B}", lambda: hf_decode_ms(
            hf, B, P, args.hf_decode_steps, clock, 1, args.hf_repeats))
        log(f"transformers {impl} decode B={B}: {res['decode'].get(f'hf-{impl}/{B}')} ms/token")
    Path(args.json).write_text(json.dumps(res, indent=1, default=str))


def _fmt(v, nd=2):
    return "—" if v is None else f"{v:.{nd}f}"


def _ratio(a, b, nd=2):
    return "—" if a is None or b is None or b == 0 else f"{a / b:.{nd}f}"


def table(res: dict, args, impls: list[str], modes: list[str]) -> str:
    pre, dec, fl = res["prefill"], res["decode"], res["floor"]
    lines = [f"Prefill, {args.prefill_len} tokens, ms (median of {args.repeats}; through last-token logits)", ""]
    cols = ["batch", "engine"] + (["engine torch-ops"] if "torch" in modes else []) + \
        [f"HF {i}" for i in impls] + [f"HF {i} / engine" for i in impls]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for B in _csv_ints(args.prefill_batches):
        e = pre.get(f"engine-fast/{B}")
        row = [str(B), _fmt(e)] + ([_fmt(pre.get(f"engine-torch/{B}"))] if "torch" in modes else [])
        row += [_fmt(pre.get(f"hf-{i}/{B}")) for i in impls] + [_ratio(pre.get(f"hf-{i}/{B}"), e) for i in impls]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Decode, prompt {args.decode_prompt} then {args.decode_steps} steps (HF: {args.hf_decode_steps}), "
              f"ms/token and tokens/s (median of {args.repeats}; HF {args.hf_repeats})", ""]
    mode_names = {"graph": "engine (CUDA graphs)", "eager": "engine (no graphs)", "torch": "engine torch-ops"}
    cols = ["batch", "floor weights", "floor +KV"] + [mode_names[m] for m in modes] + [f"HF {i}" for i in impls] + \
        ["engine tok/s"] + [f"HF {i} tok/s" for i in impls] + ["engine / floor", "engine / floor+KV"] + \
        [f"engine tok/s ÷ HF {i}" for i in impls]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    best = modes[0] if modes else "graph"
    for B in _csv_ints(args.decode_batches):
        e = dec.get(f"engine-{best}/{B}")
        tps = (lambda ms: None if ms is None else B * 1e3 / ms)
        row = [str(B), _fmt(fl[B]["weights_ms"]), _fmt(fl[B]["weights_kv_ms"])]
        row += [_fmt(dec.get(f"engine-{m}/{B}")) for m in modes] + [_fmt(dec.get(f"hf-{i}/{B}")) for i in impls]
        row += [_fmt(tps(e), 0)] + [_fmt(tps(dec.get(f"hf-{i}/{B}")), 0) for i in impls]
        row += [_ratio(e, fl[B]["weights_ms"]), _ratio(e, fl[B]["weights_kv_ms"])]
        row += [_ratio(dec.get(f"hf-{i}/{B}"), e) for i in impls]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.hf_child:
        hf_child_main(args)
        return {}
    res = run(args)
    env = res["env"]
    print()
    print(f"device: {env.get('gpu', args.device)}; torch {env['torch']}, transformers {env.get('transformers')}, "
          f"triton {env.get('triton')}, attention {env['attention']}; {env['date']}")
    if "cudnn_sdpa" in env:
        print(f"SDPA cuDNN backend: {env['cudnn_sdpa']}")
    for impl in [i for i in args.hf.split(",") if i]:
        if res.get(f"sdpa_backends/{impl}"):
            print(f"transformers {impl}: {res[f'sdpa_backends/{impl}']}")
    print(f"model: {'tiny' if args.tiny else 'Llama-2-7B shape'}, {res['model']['layers']} layers, {res['model']['dtype']}; "
          f"weights streamed per step {res['weight_bytes'] / 1e9:.3f} GB; copy bandwidth {res['copy_bw_GBps']:.0f} GB/s")
    if res.get("agreement"):
        print(f"fast path vs torch path: {res['agreement']}")
    for k, v in res.items():
        if k.startswith("hf_vs_engine_rel_diff"):
            print(f"{k}: {v:.3e}")
    print()
    print(res["table"])
    if res.get("errors"):
        print("\nerrors:", json.dumps(res["errors"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()

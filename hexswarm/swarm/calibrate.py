"""Time this node's own engine on its own device and model, for the planner.

The planner's analytic cost model is a roofline with guessed efficiencies; a
node knows better: it runs the model's first layers (all of them when they fit
in a share of the device memory), with the embedding and lm_head, and times

* a decode step at a few batch sizes (``DECODE_BATCHES``) at ``CONTEXT``
  tokens of context per row, through ``StageExecutor`` as the engine runs
  its steps (CUDA graphs on GPUs);
* a prefill of ``PROMPT`` tokens, and one step of as many such prompts as
  fill an engine step (``step_tokens``, the runtime's ``max_step_tokens``),
  both as the engine runs them (a CUDA graph up to its largest prompt-token
  bucket, else ``StageModel.forward_rows`` eagerly): one prompt is bound
  by reading the weights, a full step by compute;
* a step of ``MIXED_ROWS`` decode rows and one such prompt (chunked prefill, as
  the engine mixes them): what a prompt token costs riding on decode rows;
* with ``calibrate_runtime``: the host time a stage of a pipeline adds per step
  (beyond its GPU time, and in all) and the local link's bandwidth (the runtime's
  own engines and link code).

Weights are random: speed does not depend on their values. The result is the
dict form of ``hexswarm.plan.calibration.Calibration`` and goes into the
node's signed record. It is cached in ``<data_dir>/calibration.json`` keyed by
device name, model fingerprint and dtype, so a restart costs nothing; on the
CPU test config (a tiny model) a fresh measurement takes a few milliseconds.
The daemon runs it in a worker thread (``trio.to_thread``), never on the loop.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

from hexswarm.model.config import LlamaConfig

log = logging.getLogger(__name__)

CACHE_FILE = "calibration.json"
# v2: batched prefill, stage overhead, link bandwidth; v3: stage host time; v4: a mixed step (older entries are
# measured again; the planner still reads an older record that a peer gossips)
CACHE_VERSION = 4
DECODE_BATCHES = (1, 8, 32)
CONTEXT = 128  # context tokens per row while timing decode steps
PROMPT = 128  # prompt tokens of the timed prefill
MIXED_ROWS = 32  # decode rows of the timed mixed step (at most the largest decode batch)
MEMORY_SHARE = 0.4  # the measured layers may take this share of the device memory (the stages load beside it)
REPEATS = 5


def cache_key(device_name: str, model_fingerprint: str, dtype: str) -> str:
    return f"v{CACHE_VERSION}|{device_name}|{model_fingerprint}|{dtype}"


def layers_to_measure(cfg: LlamaConfig, device_memory_bytes: float, dtype_bytes: int) -> int:
    """All layers if they fit in MEMORY_SHARE of the device, else as many as do (at least 1)."""
    from hexswarm.plan.model_spec import ModelSpec

    spec = ModelSpec.from_config(cfg)
    ends = (spec.embedding_params + spec.head_params) * dtype_bytes
    per_layer = spec.params_per_layer * dtype_bytes
    room = device_memory_bytes * MEMORY_SHARE - ends
    return max(1, min(cfg.num_hidden_layers, int(room // per_layer)))


def measure(cfg: LlamaConfig, device: str, dtype: str, *, layers: int | None = None,
            batches: tuple[int, ...] | None = None, context: int | None = None, prompt: int | None = None,
            repeats: int = REPEATS, step_tokens: int | None = None) -> dict[str, Any]:
    """Time decode steps and prefills of the first ``layers`` layers (default: as many as fit; the
    other defaults are the module's constants, read at call time)."""
    import torch

    from hexswarm.model.shard import TensorShard
    from hexswarm.model.stage import StageModel, StagePart
    from hexswarm.runtime.stage_host import StageExecutor
    from hexswarm.daemon import step_tokens_for  # the runtime's max_step_tokens: auto

    batches, context, prompt = batches or DECODE_BATCHES, context or CONTEXT, prompt or PROMPT
    dev = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    if layers is None:
        memory = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else 8 << 30
        layers = layers_to_measure(cfg, memory, torch.tensor([], dtype=torch_dtype).element_size())
    part = StagePart(0, layers, TensorShard.for_rank(cfg, 1, 0), with_embedding=True, with_head=True)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        model = StageModel(cfg, part, torch_dtype, dev)
        gen = torch.Generator(device="cpu").manual_seed(0)
        for p in model.parameters():  # random weights: uninitialised memory may hold NaNs or denormals
            p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
        step_tokens = step_tokens or step_tokens_for(dev.type)
        many = max(1, min(step_tokens // prompt, max(batches)))  # prompts in one full step (KV slots permitting)
        kv = model.new_kv_cache(max(batches) + 1, max(context, prompt) + 2)  # + 1: the mixed step's prompt
        executor = StageExecutor(model, kv)  # each step as the engine runs it: a CUDA graph where one holds it

        def step(rows: list[tuple[int, int, int]]) -> None:
            ids = torch.zeros(sum(n for _, _, n in rows), dtype=torch.long, device=dev)
            executor.lead({"op": "forward", "rows": rows, "ids": ids})

        def decode(b: int) -> None:
            step([(i, context, 1) for i in range(b)])

        def prefill(n: int) -> None:  # n prompts back to back in one step
            step([(i, 0, prompt) for i in range(n)])

        def mixed(rows: int) -> None:  # decode rows and one prompt in one step (chunked prefill)
            step([(b, context, 1) for b in range(rows)] + [(rows, 0, prompt)])

        decode_points = [[b, _median_s(lambda b=b: decode(b), sync, repeats)] for b in batches]
        mixed_rows = min(MIXED_ROWS, max(batches))
        prefill_s = _median_s(lambda: prefill(1), sync, max(1, repeats // 2))
        out = {"decode": decode_points, "context": context, "prefill_tokens_per_s": prompt / prefill_s,
               "prompt": prompt, "layers": layers, "device": _device_name(device), "dtype": dtype,
               "mixed": [mixed_rows, prompt, _median_s(lambda: mixed(mixed_rows), sync, repeats)]}
        if many > 1:
            out["prefill_batch"] = [many * prompt, _median_s(lambda: prefill(many), sync, max(1, repeats // 2))]
    return out


def measure_runtime(cfg: LlamaConfig, model_dir: Path, device: str, dtype: str) -> dict[str, Any]:
    """The runtime's share (calibrate_runtime): per-stage host time by rows (added to, and in all), local link bytes/s.
    Empty for a one-layer model (a two-stage pipeline needs two layers)."""
    from hexswarm.swarm import calibrate_runtime as rt

    if cfg.num_hidden_layers < 2:
        return {}
    gpu = {b: t for b, t in measure(cfg, device, dtype, layers=2, batches=rt.OVERHEAD_ROWS)["decode"]}
    return {**rt.measure_stage_times(Path(model_dir), device, dtype, lambda r: gpu[r], rt.OVERHEAD_ROWS, rt.REPEATS),
            "link_Bps": rt.measure_link_Bps(cfg.hidden_size, device, dtype, tokens=rt.LINK_TOKENS)}


def _median_s(fn, sync, repeats: int) -> float:
    fn()  # warm-up (and CUDA graph capture)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return max(statistics.median(times), 1e-9)


def cached_measure(data_dir: Path, model_dir: Path, fingerprint: str, device: str, dtype: str) -> dict[str, Any]:
    """The measurement for this (device, model, dtype), from ``<data_dir>/calibration.json`` or fresh."""
    cfg = LlamaConfig.from_dir(model_dir)
    device_name = _device_name(device)
    key = cache_key(device_name, fingerprint, dtype)
    path = Path(data_dir) / CACHE_FILE
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), dict):
        return cache[key]
    log.info("calibrating %s on %s (%s), cached in %s", model_dir, device_name, dtype, path)
    result = {**measure(cfg, device, dtype), "model": fingerprint}
    try:
        result.update(measure_runtime(cfg, model_dir, device, dtype))
    except Exception as e:  # noqa: BLE001 - the kernel timings stand alone; the planner then assumes no overhead
        log.warning("runtime calibration failed (%s: %s)", type(e).__name__, e)
    cache = cache if isinstance(cache, dict) else {}
    cache[key] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    os.replace(tmp, path)
    return result


def _device_name(device: str) -> str:
    import torch

    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{os.cpu_count()}"

"""The planner's prediction against a measurement: tokens/s, TTFT and ITL per layout and concurrency.

    python tools/plan_vs_measured.py BENCH.json [--stages 1 2 4] [--concurrency 1 8 32] [--requests 200] [--json OUT]

BENCH.json is what ``tools/bench_serve.py --json FILE`` writes. The reader is tolerant; it expects
(every key but the rows optional, first spelling listed is preferred)::

    {
      "device": "NVIDIA H100 80GB HBM3",        # or "device_name" / "gpu"; matched against the GPU catalogue
      "model": "llama-2-7b",                    # a built-in name, or a HF config.json dict ("config" also read)
      "prompt_len": 32, "output_len": 128,      # or "prompt_tokens"/"prompt", "new_tokens"/"max_tokens"/"output_tokens"
      "copy_bandwidth_GBps": 3000,              # optional: measured copy bandwidth (GB/s) for an uncatalogued device
      "link": {"latency_s": 1e-4, "bandwidth_Bps": 1e10},   # optional: the stage-to-stage hop
      "engine": [{"batch": 1, "ms_per_step": 5.68}, {"batch": 32, "ms_per_step": 7.0}],
      "engine_context": 160,                    # optional: context per row during the engine rows (default prompt + output/2)
      "prefill_tokens_per_s": 20000,            # optional: measured prefill speed (else the analytic one)
      "layouts": [{"stages": 1, "concurrency": 8, "tokens_per_s": 1000.0,
                   "ttft_p50_s": 0.02, "itl_p50_s": 0.006}, ...]      # also read from "rows"/"results"/"serve"
    }

Rows may also sit in one flat list (``rows``): a row with ``ms_per_step`` is an engine row, a row
with ``stages`` a layout row. Stage counts are the number of pipeline stages, one GPU each, layers
split evenly, on one host per stage joined by ``link``; ``concurrency`` clients each keep one request
in flight (closed loop).

Predictions come from the step-level continuous-batching simulator (hexswarm/plan/batching_sim.py)
with the engine rows as the device's calibration (hexswarm/plan/calibration.py). The ITL predicted
is the median over requests of (last token - first token) / (tokens - 1).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hexswarm.plan.batching_sim import BatchSimResult, simulate_batching  # noqa: E402
from hexswarm.plan.calibration import Calibration  # noqa: E402
from hexswarm.plan.cluster import GIB, GPU_CATALOG, Cluster, GpuKind, Host, Link, cluster_from_hosts  # noqa: E402
from hexswarm.plan.cost import RooflineCostModel, StepShape  # noqa: E402
from hexswarm.plan.model_spec import ModelSpec, load_model_spec, model_spec_from_dict  # noqa: E402
from hexswarm.plan.replica import ReplicaPlanner  # noqa: E402
from hexswarm.plan.workload import LengthDist, Workload  # noqa: E402

DEFAULT_LINK = Link(100e-6, 10e9)  # two processes on one host over TCP: ~0.1 ms, ~10 GB/s


@dataclass(frozen=True)
class Measured:
    stages: int
    concurrency: int
    tokens_per_s: float | None
    ttft_p50_s: float | None
    itl_p50_s: float | None


@dataclass(frozen=True)
class Bench:
    model: ModelSpec
    device: GpuKind
    prompt_len: int
    output_len: int
    link: Link
    engine: tuple[tuple[int, float], ...]  # (batch, seconds per step)
    engine_context: int
    prefill_tokens_per_s: float | None
    layouts: tuple[Measured, ...]


def _first(d: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def _number(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _rows(doc: dict, *keys: str) -> list[dict]:
    for k in keys:
        if isinstance(doc.get(k), list):
            return [r for r in doc[k] if isinstance(r, dict)]
    return []


def _model(doc: dict) -> ModelSpec:
    m = _first(doc, "model", "config", "model_config", default="llama-2-7b")
    if isinstance(m, dict):
        if "hidden_size" not in m and isinstance(m.get("config"), dict):
            m = m["config"]
        if "hidden_size" not in m and "hidden" in m:  # bench_serve's short shape
            m = {"model_type": "llama", "num_hidden_layers": m["layers"], "hidden_size": m["hidden"],
                 "num_attention_heads": m["heads"], "num_key_value_heads": m["kv_heads"],
                 "intermediate_size": m["intermediate"], "vocab_size": m["vocab"]}
        return model_spec_from_dict(m, name=str(m.get("name", "model")))
    return load_model_spec(str(m))


def _device(doc: dict) -> GpuKind:
    name = str(_first(doc, "device", "device_name", "gpu", default="H100"))
    matches = [k for k in GPU_CATALOG.values() if k.name.replace("-80G", "").replace("-40G", "").lower() in name.lower()]
    if matches:  # the longest catalogue name that occurs in the device name ("A100-80G" before "A100")
        return max(matches, key=lambda k: len(k.name))
    bw = _number(_first(doc, "copy_bandwidth_GBps", "mem_bw_gbs"))
    return GpuKind(name, int(_number(doc.get("memory_gib")) or 80) * GIB, _number(doc.get("tflops")) or 100.0,
                   (bw or 1000.0) * 1e9)


def read_bench(doc: dict) -> Bench:
    """Parse bench_serve's JSON (see the module docstring); raise ValueError when it has no usable rows."""
    flat = _rows(doc, "rows")
    engine_rows = _rows(doc, "engine", "engine_rows") or [r for r in flat if "ms_per_step" in r]
    layout_rows = _rows(doc, "layouts", "results", "serve") or [r for r in flat if "stages" in r]
    engine = sorted({(int(r["batch"]), float(r["ms_per_step"]) / 1e3) for r in engine_rows
                     if _number(r.get("batch")) and _number(r.get("ms_per_step"))})
    layouts = tuple(Measured(int(r["stages"]), int(_first(r, "concurrency", "clients", default=1)),
                             _number(_first(r, "tokens_per_s", "tok_s")), _number(_first(r, "ttft_p50_s", "ttft_s")),
                             _number(_first(r, "itl_p50_s", "itl_s")))
                    for r in layout_rows if _number(r.get("stages")))
    if not engine and not layouts:
        raise ValueError("no engine rows and no layout rows")
    prompt = int(_first(doc, "prompt_len", "prompt_tokens", "prompt", default=32))
    output = int(_first(doc, "output_len", "new_tokens", "max_tokens", "output_tokens", default=128))
    link = doc.get("link") if isinstance(doc.get("link"), dict) else {}
    return Bench(
        model=_model(doc), device=_device(doc), prompt_len=prompt, output_len=output,
        link=Link(_number(link.get("latency_s")) or DEFAULT_LINK.latency_s,
                  _number(link.get("bandwidth_Bps")) or DEFAULT_LINK.bandwidth_Bps),
        engine=tuple(_dedupe(engine)), engine_context=int(_number(doc.get("engine_context")) or prompt + output // 2),
        prefill_tokens_per_s=_number(doc.get("prefill_tokens_per_s")), layouts=layouts)


def _dedupe(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """One time per batch size (the median of repeats), ascending."""
    by_batch: dict[int, list[float]] = {}
    for b, t in points:
        by_batch.setdefault(b, []).append(t)
    return [(b, sorted(ts)[len(ts) // 2]) for b, ts in sorted(by_batch.items())]


def calibrated_device(bench: Bench) -> GpuKind:
    """The device with the engine rows as its calibration (prefill: measured, else the analytic speed)."""
    if not bench.engine:
        return bench.device
    prefill = bench.prefill_tokens_per_s
    if prefill is None:
        cost = RooflineCostModel(bench.model, bench.prompt_len, bench.output_len, bench.prompt_len + bench.output_len)
        t = cost.analytic_step_s(bench.device, 1, bench.model.num_layers, last=True, shape=StepShape.prefill(1, bench.prompt_len))
        prefill = bench.prompt_len / t
    cal = Calibration(decode=bench.engine, context=bench.engine_context, prefill_tokens_per_s=prefill, prompt=bench.prompt_len)
    d = bench.device
    return GpuKind(d.name, d.memory_bytes, d.tflops, d.mem_bw_Bps, calibration=cal)


def pipeline(bench: Bench, stages: int, max_batch: int) -> tuple[Cluster, RooflineCostModel, list]:
    kind = calibrated_device(bench)
    hosts = [Host(f"s{i}", (kind,), region="one") for i in range(stages)]
    cluster = cluster_from_hosts(hosts, {}, intra_region=bench.link, inter_region=bench.link, name=f"pp{stages}")
    total = bench.prompt_len + bench.output_len
    cost = RooflineCostModel(bench.model, bench.prompt_len, bench.output_len, total, max_batch=max_batch)
    L = bench.model.num_layers
    split = [L // stages + (1 if i < L % stages else 0) for i in range(stages)]
    layout = ReplicaPlanner(cluster, cost, batch=max_batch).layout([(i, kind.name, 1, n) for i, n in enumerate(split)])
    if layout is None:
        raise ValueError(f"{bench.model.name} does not fit {stages} x {kind.name} at batch {max_batch}")
    return cluster, cost, [layout]


def predict(bench: Bench, stages: int, concurrency: int, requests: int, seed: int = 0) -> BatchSimResult:
    cluster, cost, layouts = pipeline(bench, stages, concurrency)
    work = Workload(1.0, 1e9, LengthDist.constant(bench.prompt_len), LengthDist.constant(bench.output_len),
                    concurrency, max(requests, 16 * concurrency))  # many waves: the final drain is a small share
    return simulate_batching(cluster, cost, layouts, work, seed=seed, closed_loop=concurrency)


def _ratio(pred: float, meas: float | None) -> str:
    return f"{pred / meas:.2f}" if meas else "-"


def _fmt(x: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def compare(bench: Bench, stages: list[int], concurrency: list[int], requests: int) -> list[dict[str, Any]]:
    measured = {(m.stages, m.concurrency): m for m in bench.layouts}
    out = []
    for s in stages:
        for c in concurrency:
            p = predict(bench, s, c, requests)
            m = measured.get((s, c))
            out.append({"stages": s, "concurrency": c, "predicted": {"tokens_per_s": p.tokens_per_s, "ttft_p50_s": p.ttft_p50_s,
                                                                      "itl_p50_s": p.itl_p50_s},
                        "measured": None if m is None else {"tokens_per_s": m.tokens_per_s, "ttft_p50_s": m.ttft_p50_s,
                                                           "itl_p50_s": m.itl_p50_s}})
    return out


def markdown(bench: Bench, rows: list[dict[str, Any]]) -> str:
    lines = [f"model {bench.model.name}, device {bench.device.name}, prompt {bench.prompt_len}, output {bench.output_len}, "
             f"engine rows {', '.join(f'B{b}: {t * 1e3:.2f} ms' for b, t in bench.engine) or 'none (analytic)'}", "",
             "| stages | concurrency | tok/s pred | tok/s meas | ratio | TTFT p50 ms pred | meas | ratio | ITL p50 ms pred | meas | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, m = r["predicted"], r["measured"] or {}
        lines.append(f"| {r['stages']} | {r['concurrency']} | {p['tokens_per_s']:.1f} | {_fmt(m.get('tokens_per_s'))} | "
                     f"{_ratio(p['tokens_per_s'], m.get('tokens_per_s'))} | {p['ttft_p50_s'] * 1e3:.2f} | "
                     f"{_fmt(m.get('ttft_p50_s'), 1e3, 2)} | {_ratio(p['ttft_p50_s'], m.get('ttft_p50_s'))} | "
                     f"{p['itl_p50_s'] * 1e3:.3f} | {_fmt(m.get('itl_p50_s'), 1e3, 3)} | {_ratio(p['itl_p50_s'], m.get('itl_p50_s'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_json", type=Path)
    ap.add_argument("--stages", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=200, help="simulated requests per cell (at least 16 x concurrency)")
    ap.add_argument("--json", type=Path, help="also write the comparison as JSON here")
    args = ap.parse_args(argv)
    try:
        bench = read_bench(json.loads(args.bench_json.read_text()))
        rows = compare(bench, args.stages, args.concurrency, args.requests)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"plan_vs_measured: {args.bench_json}: {e}", file=sys.stderr)
        return 2
    print(markdown(bench, rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

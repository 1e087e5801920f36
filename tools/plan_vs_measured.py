"""The planner's prediction against a measurement: tokens/s, TTFT and ITL per layout and concurrency.

    python tools/plan_vs_measured.py BENCH.json [MORE.json ...] [--frontend http] [--calibration CAL.json]
        [--stages 1 2 4] [--concurrency 1 8 32] [--entry-ms X] [--entry-done-ms X] [--entry-latency-ms X]
        [--stage-overhead-ms 1:0.7,32:1.0]
        [--link-gbps G] [--json OUT]

BENCH.json is what ``tools/bench_serve.py --json FILE`` writes (its ``serve`` rows, one front end:
``--frontend``, default http), or the older documented schema (every key but the rows optional)::

    {
      "device": "NVIDIA H100 80GB HBM3",        # or "device_name" / "gpu"; matched against the GPU catalogue
      "model": "llama-2-7b",                    # a built-in name, a HF config.json dict, or bench_serve's shape
      "prompt_tokens": 128, "new_tokens": 128,  # or "prompt_len"/"prompt", "output_len"/"max_tokens"/"output_tokens"
      "engine": [{"batch": 1, "ms_per_step": 5.68}, ...],   # decode steps of the whole model (bench_gpu)
      "prefill_ms": 16.6,                       # one prompt's prefill (or "prefill_tokens_per_s")
      "prefill_batch": {"prompts": 16, "ms": 45.3},          # one forward of several prompts
      "node_extra": {"micro_batches": 1},       # node config of the swarm: micro_batches, max_step_tokens
      "calibration": {...},                     # optional: a node calibration (plan/calibration.py form)
      "serve": [{"stages": 1, "frontend": "http", "concurrency": 8, "requests": 16, "tokens_per_s": 1000.0,
                 "ttft_p50_s": 0.02, "itl_p50_s": 0.006}, ...]    # also read from "layouts"/"rows"/"results"
    }

What the prediction is made of, each printed with where it came from:

* the device's calibration (hexswarm/plan/calibration.py): ``--calibration FILE`` (what
  ``tools/calibrate_node.py`` or a node's ``calibration.json`` holds) first, then the bench's own engine
  rows (decode, one prompt's prefill, batched prefill), then flags for what neither has: the per-stage
  host time of a pipeline (``--stage-overhead-ms``) and the local link's speed (``--link-gbps``);
  a quantity found nowhere is taken as not there (0 overhead, the analytic intra-host link);
* the runtime's rules: token budget ``max_step_tokens`` (node_extra, else the node's auto: 2048 on CUDA,
  512 on CPU), chunked prefill, ``micro_batches`` (node_extra, else one per stage as the node default), a
  one-stage CUDA pipeline hides its host work behind the GPU and (``gather_prompts``, node_extra, else the
  node default the run recorded, else on: the default before 2026-11-27)
  waits for the step on the GPU before starting new prompts, and (bench_serve) every stage on the same
  device, so the stages' GPU time adds up, handing steps over on the GPU (a stage's host passes a step on
  after its host time ``stage_host``, while its GPU part still runs; the next part waits for it);
  ``--host-handoff`` for runs before that: GPU time + ``stage_overhead`` + link);
* the load: ``concurrency`` closed-loop clients, the measured row's request count (so the same waves:
  every client's first request is sent at once, or with ``--arrival staggered`` client j's at j/c of the
  row's ``stagger_period_s``, as bench_serve sent them; starts due together reach stage 0 one by one, so the
  first of a wave runs alone), and the entry node's event loop (batching_sim's ``_Entry``): serial work
  per arriving request (front end, tokenizer, dispatch; the starts go through the loop behind it, so a
  wave reaches stage 0 once it is all in) and per finished request, and a latency to each first token
  that is not serial: per stage count from bench_serve's entry probe (``entry_probe`` rows: the burst's
  first TTFT gives the work per request in, its median the work per request done, the tiny requests
  alone the latency, less the model's own time for them), else ``--entry-ms`` / ``--entry-done-ms`` /
  ``--entry-latency-ms``, else 0.

Nothing is fitted to the serving rows it compares against: every quantity comes from the calibration,
the bench's engine rows, the entry probe (tiny requests, before the levels) or a flag.

The predicted ITL is the median over every gap between two tokens of a request, and percentiles are
nearest rank, as bench_serve reports them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hexswarm.plan.batching_sim import BatchSimResult, simulate_batching, step_timer  # noqa: E402
from hexswarm.plan.calibration import Calibration, CalibrationError, parse_calibration  # noqa: E402
from hexswarm.plan.cluster import (DEFAULT_INTRA_HOST, GIB, GPU_CATALOG, Cluster, GpuKind, Host, Link,  # noqa: E402
                                   cluster_from_hosts)
from hexswarm.plan.cost import RooflineCostModel, StepShape  # noqa: E402
from hexswarm.plan.model_spec import ModelSpec, load_model_spec, model_spec_from_dict  # noqa: E402
from hexswarm.plan.replica import ReplicaPlanner  # noqa: E402
from hexswarm.daemon import step_tokens_for  # noqa: E402  (max_step_tokens: auto, as a node sets it)
from hexswarm.plan.workload import LengthDist, Workload, staggered_starts  # noqa: E402

TARGET = 0.2  # the "every predicted median within 20% of the measured one"
NO_HOP = Link(1e-9, 1e15)  # stages on one host: the hop is in the calibration's stage overhead and link speed
BENCH_ENGINE_STEPS = 32  # bench_serve's decode steps per engine row on CUDA (context = prompt + steps / 2)


@dataclass(frozen=True)
class Measured:
    stages: int
    concurrency: int
    tokens_per_s: float | None
    ttft_p50_s: float | None
    itl_p50_s: float | None
    requests: int | None = None
    stagger_period_s: float = 0.0  # bench_serve --arrival staggered: client j of c first sent at j/c of this
    think_max_s: float = 0.0  # ... and each waited up to this after an answer (workload.think_times)


@dataclass(frozen=True)
class EntryProbe:
    """bench_serve's entry probe on one swarm: TTFTs of tiny requests alone and in one burst."""

    stages: int
    prompt_len: int
    alone_ttft_s: tuple[float, ...]
    burst: int
    burst_ttft_s: tuple[float, ...]
    # a burst of streaming requests: the entry node's own CPU seconds over the tokens it relayed, and its event
    # loop's busy seconds (wall time, where the node reports it: what a start or a token waits behind)
    stream_requests: int = 0
    stream_tokens: int = 0
    stream_cpu_s: float = 0.0
    stream_loop_s: float = 0.0


@dataclass(frozen=True)
class Bench:
    model: ModelSpec
    device: GpuKind
    prompt_len: int
    output_len: int
    link: Link | None  # the stage-to-stage hop when stages are on separate hosts (old schema); None: one host
    calibration: Calibration | None
    sources: dict[str, str]  # quantity -> where it came from
    layouts: tuple[Measured, ...]
    micro_batches: int | None = None  # None: one per stage (the node default)
    step_tokens: int = 2048
    gather_prompts: bool = False  # the node setting (node_extra, else the run's node default)
    shared_device: bool = True
    entry_s: float = 0.0
    entry_latency_s: float = 0.0
    entry_done_s: float = 0.0
    cuda: bool = True  # a one-stage pipeline overlaps its host work with the GPU only on CUDA
    gpu_handoff: bool = True  # CUDA stages on one GPU hand over on it (the runtime since run 10, 2026-11-25)
    entry_probes: tuple[EntryProbe, ...] = ()
    # (stages, Entry) per stage count, from the probes (estimate_entries); else the flags' for all
    entries: tuple[tuple[int, "Entry"], ...] = ()

    @property
    def hands_over_on_gpu(self) -> bool:
        """Stage processes on one CUDA device, handing steps over on it (runtime/gpu_handoff.py)."""
        return self.gpu_handoff and self.shared_device and self.cuda

    @property
    def engine(self) -> tuple[tuple[int, float], ...]:
        return self.calibration.decode if self.calibration else ()


@dataclass(frozen=True)
class Entry:
    """What the swarm's entry adds to a request (batching_sim's entry loop): serial work per arriving
    request (``arrive_s``) and per finished one (``done_s``) on the entry's event loop, and a latency
    that is not serial (``latency_s``: the rest of a request's way to its first token, as the probe's
    requests alone show it beyond the model's own time for them; negative where the model's time for
    a request alone is already longer than the swarm's whole answer)."""

    arrive_s: float = 0.0
    done_s: float = 0.0
    latency_s: float = 0.0
    token_s: float = 0.0  # serial work per token relayed (the probe's streaming burst)


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
            m = {"name": f"bench_serve random {m['layers']}-layer, hidden {m['hidden']}", "model_type": "llama",
                 "num_hidden_layers": m["layers"], "hidden_size": m["hidden"],
                 "num_attention_heads": m["heads"], "num_key_value_heads": m["kv_heads"],
                 "intermediate_size": m["intermediate"], "vocab_size": m["vocab"]}
        return model_spec_from_dict(m, name=str(m.get("name", "model")))
    return load_model_spec(str(m))


def _device(doc: dict) -> GpuKind:
    name = str(_first(doc, "device", "device_name", "gpu", default="H100"))
    matches = [k for k in GPU_CATALOG.values() if k.name.replace("-80G", "").replace("-40G", "").lower() in name.lower()]
    if matches:  # the longest catalogue name that occurs in the device name ("A100-80G" before "A100")
        return max(matches, key=lambda k: len(k.name))
    bw = _number(_first(doc, "copy_bandwidth_GBps", "copy_bw_GBps", "mem_bw_gbs"))
    return GpuKind(name, int(_number(doc.get("memory_gib")) or 80) * GIB, _number(doc.get("tflops")) or 100.0,
                   (bw or 1000.0) * 1e9)


def _dedupe(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """One time per batch size (the median of repeats), ascending."""
    by_batch: dict[int, list[float]] = {}
    for b, t in points:
        by_batch.setdefault(b, []).append(t)
    return [(b, sorted(ts)[len(ts) // 2]) for b, ts in sorted(by_batch.items())]


@dataclass
class _CalibrationParts:
    """The calibration assembled quantity by quantity, each with its source."""

    fields: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def offer(self, key: str, value: Any, source: str) -> None:
        if value is not None and key not in self.fields:
            self.fields[key], self.sources[key] = value, source


def _engine_parts(doc: dict, where: str, prompt: int, output: int) -> _CalibrationParts:
    """What the bench's own engine rows measure: decode by batch, one prompt's prefill, a batched prefill."""
    parts = _CalibrationParts()
    flat = _rows(doc, "rows")
    engine_rows = _rows(doc, "engine", "engine_rows") or [r for r in flat if "ms_per_step" in r]
    engine = _dedupe([(int(r["batch"]), float(r["ms_per_step"]) / 1e3) for r in engine_rows
                      if _number(r.get("batch")) and _number(r.get("ms_per_step"))])
    if engine:
        context = _number(doc.get("engine_context"))
        if context is None:
            context = prompt + (BENCH_ENGINE_STEPS // 2 if "serve" in doc else output // 2)
        parts.offer("decode", [[b, t] for b, t in engine], f"engine rows of {where}")
        parts.offer("context", int(context), f"engine rows of {where}")
    rate = _number(doc.get("prefill_tokens_per_s"))
    if rate is None and _number(doc.get("prefill_ms")):
        rate = prompt / (float(doc["prefill_ms"]) / 1e3)
    parts.offer("prefill_tokens_per_s", rate, f"prefill_ms of {where}")
    batch = doc.get("prefill_batch") if isinstance(doc.get("prefill_batch"), dict) else {}
    if _number(batch.get("prompts")) and _number(batch.get("ms")):
        parts.offer("prefill_batch", [int(batch["prompts"]) * prompt, float(batch["ms"]) / 1e3],
                    f"prefill_batch of {where}: {int(batch['prompts'])} x {prompt} tokens")
    return parts


def _analytic_prefill_rate(model: ModelSpec, device: GpuKind, prompt: int, output: int) -> float:
    cost = RooflineCostModel(model, prompt, output, prompt + output)
    return prompt / cost.analytic_step_s(device, 1, model.num_layers, last=True, shape=StepShape.prefill(1, prompt))


def build_calibration(parts: _CalibrationParts, model: ModelSpec, device: GpuKind, prompt: int,
                      output: int) -> tuple[Calibration | None, dict[str, str]]:
    """A Calibration from the parts; the decode rows are the one thing it cannot do without."""
    f, src = dict(parts.fields), dict(parts.sources)
    if "decode" not in f:
        return None, {"decode": "none: the analytic roofline"}
    if "prefill_tokens_per_s" not in f:
        f["prefill_tokens_per_s"] = _analytic_prefill_rate(model, device, prompt, output)
        src["prefill_tokens_per_s"] = "analytic (not measured)"
    f.setdefault("prompt", prompt)
    f.setdefault("context", prompt + output // 2)
    for key, missing in (("prefill_batch", "not measured (one-prompt ratio for every step)"),
                         ("stage_overhead", "not measured: 0 (no host time per stage)"),
                         ("link_Bps", "not measured: the analytic intra-host link")):
        src.setdefault(key, missing)
    return parse_calibration(f), src


def _calibration_file(path: Path) -> dict:
    """A calibration dict: the file itself, its "calibration" key, or the one entry of a node's cache."""
    doc = json.loads(path.read_text())
    if isinstance(doc, dict) and "decode" not in doc:
        doc = doc.get("calibration") or (next(iter(doc.values())) if len(doc) == 1 else doc)
    parse_calibration(doc)  # refuse a malformed file here, with its name
    return doc


def _flag_overhead(text: str) -> list[list]:
    points = []
    for item in text.split(","):
        rows, ms = item.split(":")
        points.append([int(rows), float(ms) / 1e3])
    return sorted(points)


# node settings a bench run without `node_defaults` (before 2026-11-27) ran with when its node_extra had none
OLD_NODE_DEFAULTS = {"gather_prompts": True}


def node_default(key: str, doc: dict):
    """The node's default for `key` in the run `doc` (bench_serve records them), else the old default."""
    recorded = doc.get("node_defaults")
    return recorded[key] if isinstance(recorded, dict) and key in recorded else OLD_NODE_DEFAULTS[key]


def read_bench(doc: dict, where: str = "the bench file", *, frontend: str | None = "http", arrival: str = "burst",
               calibration: dict | None = None, calibration_name: str = "--calibration",
               stage_overhead_ms: str | None = None, link_gbps: float | None = None, entry_ms: float | None = None,
               entry_latency_ms: float | None = None, entry_done_ms: float | None = None,
               shared_device: bool = True) -> Bench:
    """Parse bench_serve's JSON (see the module docstring); raise ValueError when it has no usable rows."""
    flat = _rows(doc, "rows")
    layout_rows = _rows(doc, "serve", "layouts", "results") or [r for r in flat if "stages" in r]
    if frontend and any("frontend" in r for r in layout_rows):
        layout_rows = [r for r in layout_rows if r.get("frontend") == frontend]
    layout_rows = [r for r in layout_rows if r.get("arrival", "burst") == arrival]
    layouts = tuple(Measured(int(r["stages"]), int(_first(r, "concurrency", "clients", default=1)),
                             _number(_first(r, "tokens_per_s", "tok_s")), _number(_first(r, "ttft_p50_s", "ttft_s")),
                             _number(_first(r, "itl_p50_s", "itl_s")), int(_number(r.get("requests")) or 0) or None,
                             _number(r.get("stagger_period_s")) or 0.0, _number(r.get("think_max_s")) or 0.0)
                    for r in layout_rows if _number(r.get("stages")))
    prompt = int(_first(doc, "prompt_len", "prompt_tokens", "prompt", default=32))
    output = int(_first(doc, "output_len", "new_tokens", "max_tokens", "output_tokens", default=128))
    model, device = _model(doc), _device(doc)
    parts = _CalibrationParts()
    for cal, name in ((calibration, calibration_name), (doc.get("calibration"), f"the calibration in {where}")):
        if isinstance(cal, dict):
            for k, v in cal.items():
                parts.offer(k, v, name)
    bench_parts = _engine_parts(doc, where, prompt, output)
    for k, v in bench_parts.fields.items():
        parts.offer(k, v, bench_parts.sources[k])
    if stage_overhead_ms:
        parts.offer("stage_overhead", _flag_overhead(stage_overhead_ms), "--stage-overhead-ms")
    if link_gbps:
        parts.offer("link_Bps", link_gbps * 1e9, "--link-gbps")
    if "decode" not in parts.fields and not layouts:
        raise ValueError("no engine rows and no layout rows")
    try:
        cal, sources = build_calibration(parts, model, device, prompt, output)
    except CalibrationError as e:
        raise ValueError(f"calibration: {e}") from None
    extra = doc.get("node_extra") if isinstance(doc.get("node_extra"), dict) else {}
    micro = int(_number(extra.get("micro_batches")) or 0) or None
    cuda = not str(_first(doc, "device", "device_name", "gpu", default="")).lower().startswith("cpu")
    auto = step_tokens_for("cuda" if cuda else "cpu")
    step_tokens = int(_number(extra.get("max_step_tokens")) or 0) or auto
    sources["micro_batches"] = f"node_extra of {where}" if micro else "node default (one per stage)"
    sources["max_step_tokens"] = f"node_extra of {where}" if extra.get("max_step_tokens") else \
        f"auto on {'CUDA' if cuda else 'CPU'}"
    flags = {"entry": ("--entry-ms", entry_ms), "entry_latency": ("--entry-latency-ms", entry_latency_ms),
             "entry_done": ("--entry-done-ms", entry_done_ms)}
    for key, (flag, value) in flags.items():
        sources[key] = flag if value is not None else "not measured: 0"
    flagged = any(value is not None for _, value in flags.values())
    probes = tuple(_probe(r) for r in _rows(doc, "entry_probe") if not frontend or r.get("frontend") == frontend)
    probes = tuple(p for p in probes if p is not None)
    if probes and not flagged:
        for key in flags:
            sources[key] = f"entry probe of {where} (tiny requests alone and in a burst)"
    old_link = doc.get("link") if isinstance(doc.get("link"), dict) else None  # the older schema's separate hosts
    link = None if old_link is None else Link(_number(old_link.get("latency_s")) or 100e-6,
                                              _number(old_link.get("bandwidth_Bps")) or 10e9)
    return Bench(model=model, device=device, prompt_len=prompt, output_len=output, link=link, calibration=cal,
                 sources=sources, layouts=layouts, micro_batches=micro, step_tokens=step_tokens,
                 gather_prompts=extra.get("gather_prompts", node_default("gather_prompts", doc)) is not False,
                 shared_device=shared_device and link is None, entry_s=(entry_ms or 0.0) / 1e3,
                 entry_latency_s=(entry_latency_ms or 0.0) / 1e3, entry_done_s=(entry_done_ms or 0.0) / 1e3, cuda=cuda,
                 entry_probes=probes if not flagged else ())


def _probe(r: dict) -> EntryProbe | None:
    def times(key: str) -> tuple[float, ...]:
        return tuple(sorted(x for x in (_number(v) for v in r.get(key) or []) if x is not None and x > 0))

    alone, burst = times("alone_ttft_s"), times("burst_ttft_s")
    if not (_number(r.get("stages")) and _number(r.get("burst")) and alone and burst):
        return None
    stream = r.get("stream") if isinstance(r.get("stream"), dict) else {}
    return EntryProbe(int(r["stages"]), int(_number(r.get("prompt_tokens")) or 2), alone, int(r["burst"]), burst,
                      int(_number(stream.get("requests")) or 0), int(_number(stream.get("tokens")) or 0),
                      _number(stream.get("entry_cpu_s")) or 0.0, _number(stream.get("entry_loop_busy_s")) or 0.0)


def _median(sorted_values: tuple[float, ...]) -> float:
    """Nearest rank, as bench_serve's p50."""
    return sorted_values[max(0, math.ceil(len(sorted_values) / 2) - 1)]


def _solve(f, target: float, hi: float) -> float:
    """The smallest x >= 0 with f(x) >= target, for f growing with x (0 when f(0) already is)."""
    if f(0.0) >= target:
        return 0.0
    lo = 0.0
    for _ in range(60):  # f grows without bound with x
        if f(hi) >= target:
            break
        lo, hi = hi, 2 * hi
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return hi


def estimate_entry(bench: Bench, probe: EntryProbe) -> Entry:
    """The entry of one swarm from its probe, read through this model (batching_sim's entry loop):

    * the burst's first answer: every tiny request of the burst is taken in before any start reaches
      stage 0, so the first TTFT is the whole burst's work in plus one request's way: ``arrive_s``;
    * the burst's median: after the first, the answers go out one by one, each request's end costing
      the loop ``done_s`` before the next token goes out: ``done_s``;
    * alone: the median TTFT less the model's own time for it (its entry work, its prompt through the
      stages): ``latency_s``;
    * the streaming burst (where probed): the entry's event loop busy seconds over it (its CPU seconds from
      an older node), less the requests' ``arrive_s`` + ``done_s``, per token relayed: ``token_s``.

    Each is solved with the other two fixed, a few rounds (they hardly depend on each other)."""
    tiny = replace(bench, prompt_len=probe.prompt_len, output_len=1, entry_s=0.0, entry_latency_s=0.0,
                   entry_done_s=0.0, entries=())
    alone_t, first_t, median_t = _median(probe.alone_ttft_s), probe.burst_ttft_s[0], _median(probe.burst_ttft_s)

    def alone(e: Entry) -> float:
        return predict(tiny, probe.stages, 1, len(probe.alone_ttft_s), entry=e).ttft_p50_s

    def burst(e: Entry):
        return predict(tiny, probe.stages, probe.burst, probe.burst, entry=e)

    e = Entry()
    e = replace(e, latency_s=alone_t - alone(e))
    for _ in range(4):
        e = replace(e, arrive_s=_solve(lambda x: burst(replace(e, arrive_s=x)).ttft_min_s, first_t,
                                       max(first_t, 1e-4) / probe.burst))
        e = replace(e, done_s=_solve(lambda x: burst(replace(e, done_s=x)).ttft_p50_s, median_t,
                                     max(median_t, 1e-4) / probe.burst))
        e = replace(e, latency_s=e.latency_s + alone_t - alone(e))
    if probe.stream_tokens > 0:  # the entry's loop (else its CPU) over the streaming burst, less per-request work
        busy = probe.stream_loop_s or probe.stream_cpu_s
        e = replace(e, token_s=max(0.0, busy - probe.stream_requests * (e.arrive_s + e.done_s)) / probe.stream_tokens)
    return e


def estimate_entries(bench: Bench) -> Bench:
    """The bench with each probed stage count's entry quantities (nothing changes without probes)."""
    found = {p.stages: estimate_entry(bench, p) for p in bench.entry_probes}
    return replace(bench, entries=tuple(sorted(found.items())))


def _entry(bench: Bench, stages: int) -> Entry:
    return next((e for s, e in bench.entries if s == stages),
                Entry(bench.entry_s, bench.entry_done_s, bench.entry_latency_s))


def calibrated_device(bench: Bench) -> GpuKind:
    d = bench.device
    return replace(d, calibration=bench.calibration) if bench.calibration else d


def pipeline(bench: Bench, stages: int, max_batch: int) -> tuple[Cluster, RooflineCostModel, list]:
    """``stages`` stages of an even layer split: on one host (bench_serve: one GPU, local links between
    stage engines, whose cost is the calibration's) or, with the old schema's ``link``, one host each."""
    kind = calibrated_device(bench)
    total = bench.prompt_len + bench.output_len
    cost = RooflineCostModel(bench.model, bench.prompt_len, bench.output_len, total, max_batch=max_batch,
                             step_tokens=bench.step_tokens)
    L = bench.model.num_layers
    split = [L // stages + (1 if i < L % stages else 0) for i in range(stages)]
    if bench.link is None:
        cal = bench.calibration
        intra = NO_HOP if cal is not None and cal.link_Bps else DEFAULT_INTRA_HOST
        cluster = cluster_from_hosts([Host("h0", (kind,), region="one", intra=intra)], {}, intra_region=intra,
                                     inter_region=intra, name=f"pp{stages}")
        hosts = [0] * stages
    else:
        cluster = cluster_from_hosts([Host(f"s{i}", (kind,), region="one") for i in range(stages)], {},
                                     intra_region=bench.link, inter_region=bench.link, name=f"pp{stages}")
        hosts = list(range(stages))
    layout = ReplicaPlanner(cluster, cost, batch=max_batch).layout([(h, kind.name, 1, n) for h, n in zip(hosts, split)])
    if layout is None:
        raise ValueError(f"{bench.model.name} does not fit {stages} x {kind.name} at batch {max_batch}")
    return cluster, cost, [layout]


def predict(bench: Bench, stages: int, concurrency: int, requests: int | None = None, seed: int = 0, *,
            entry: Entry | None = None, client_starts: list[float] | None = None,
            think_max_s: float = 0.0) -> BatchSimResult:
    """One layout at one concurrency: ``requests`` requests from ``concurrency`` closed-loop clients
    (first sent at ``client_starts``, default all at 0; waiting up to ``think_max_s`` after an answer),
    the entry of that stage count (or ``entry``)."""
    cluster, cost, layouts = pipeline(bench, stages, concurrency)
    n = requests or 16 * concurrency
    work = Workload(1.0, 1e9, LengthDist.constant(bench.prompt_len), LengthDist.constant(bench.output_len),
                    concurrency, n)
    e = entry or _entry(bench, stages)
    return simulate_batching(cluster, cost, layouts, work, seed=seed, closed_loop=concurrency,
                             step_tokens=bench.step_tokens, micro_batches=bench.micro_batches,
                             gather_prompts=bench.gather_prompts,
                             shared_device=bench.shared_device, overlap=bench.cuda, entry_s=e.arrive_s,
                             entry_latency_s=e.latency_s, entry_done_s=e.done_s, entry_token_s=e.token_s,
                             gpu_handoff=bench.hands_over_on_gpu, client_starts=client_starts,
                             think_max_s=think_max_s)


def _ratio(pred: float, meas: float | None) -> float | None:
    return pred / meas if meas else None


def compare(bench: Bench, stages: list[int], concurrency: list[int], requests: int | None = None) -> list[dict[str, Any]]:
    """One row per (stages, concurrency): predicted, measured (None where not measured) and ratios.
    The simulated request count is the measured row's (the same closed-loop waves), else ``requests``."""
    measured = {(m.stages, m.concurrency): m for m in bench.layouts}
    if bench.entry_probes and not bench.entries:
        bench = estimate_entries(bench)
    out = []
    for s in stages:
        for c in concurrency:
            m = measured.get((s, c))
            starts = staggered_starts(c, m.stagger_period_s) if m and m.stagger_period_s else None
            p = predict(bench, s, c, (m.requests if m else None) or requests, client_starts=starts,
                        think_max_s=m.think_max_s if m else 0.0)
            pred = {"tokens_per_s": p.tokens_per_s, "ttft_p50_s": p.ttft_p50_s, "itl_p50_s": p.gap_p50_s}
            meas = None if m is None else {"tokens_per_s": m.tokens_per_s, "ttft_p50_s": m.ttft_p50_s, "itl_p50_s": m.itl_p50_s}
            ratios = {k: _ratio(v, (meas or {}).get(k)) for k, v in pred.items()}
            out.append({"stages": s, "concurrency": c, "predicted": pred, "measured": meas, "ratio": ratios})
    return out


def within(rows: list[dict[str, Any]]) -> tuple[int, int]:
    """(medians within TARGET of the measured one, medians compared)."""
    ratios = [r for row in rows for r in row["ratio"].values() if r is not None]
    return sum(1 for r in ratios if abs(r - 1) <= TARGET), len(ratios)


def _fmt(x: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def _fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.2f}" if abs(r - 1) <= TARGET else f"**{r:.2f}**"


def _stage_host(bench: Bench) -> str:
    """The stage host time the simulation uses, at the calibration's row counts, and where it came from."""
    cal = bench.calibration
    if not cal.stage_host and not cal.stage_overhead:
        return "0 (not measured)"
    cluster, cost, (layout,) = pipeline(bench, 2, 1)
    timer = step_timer(cluster, cost, layout)
    rows = [r for r, _ in (cal.stage_host or cal.stage_overhead)]
    values = " ".join(f"B{r} {timer.host_s(0, StepShape.decode(r, cal.context)) * 1e3:.2f} ms" for r in rows)
    how = ("stage_host of the calibration" if cal.stage_host else
           "a v2 calibration: its overhead plus half its own GPU time of the two 1-layer stages it was measured on")
    return f"{values} ({how})"


def _entry_text(bench: Bench) -> str:
    if bench.entry_probes:
        per = "; ".join(f"{s} stage(s): {e.arrive_s * 1e3:.2f} ms per request in, {e.done_s * 1e3:.2f} ms per "
                        f"request done, {e.token_s * 1e6:.0f} us per token relayed, {e.latency_s * 1e3:+.2f} ms to "
                        "the first token"
                        for s, e in (bench.entries or estimate_entries(bench).entries))
        return f"- entry ({bench.sources['entry']}): {per}"
    return (f"- entry: {bench.entry_s * 1e3:.2f} ms per request in ({bench.sources['entry']}), "
            f"{bench.entry_done_s * 1e3:.2f} ms per request done ({bench.sources['entry_done']}), "
            f"{bench.entry_latency_s * 1e3:+.2f} ms to the first token ({bench.sources['entry_latency']})")


def markdown(bench: Bench, rows: list[dict[str, Any]]) -> str:
    cal = bench.calibration
    engine = ", ".join(f"B{b} {t * 1e3:.2f} ms" for b, t in bench.engine) or "none (analytic)"
    placed = "every stage on one device" if bench.shared_device else "one device per stage"
    if bench.shared_device and bench.cuda:
        placed += (", handing steps over on the GPU (a stage turns a step in max(GPU, host time))" if bench.gpu_handoff
                   else ", handing steps over through the host (GPU time + host time per stage)")
    lines = [f"model {bench.model.name}, device {bench.device.name}, prompt {bench.prompt_len}, output "
             f"{bench.output_len}; {placed}",
             f"- decode: {engine} ({bench.sources.get('decode')})"]
    if cal is not None:
        lines.append(f"- prefill, one prompt: {cal.prefill_tokens_per_s:,.0f} tokens/s ({bench.sources['prefill_tokens_per_s']})")
        pb = cal.prefill_batch
        lines.append("- prefill, full step: " + (f"{pb[0] / pb[1]:,.0f} tokens/s at {pb[0]} tokens " if pb else "")
                     + f"({bench.sources['prefill_batch']})")
        over = " ".join(f"B{r} {t * 1e3:.2f} ms" for r, t in cal.stage_overhead)
        lines.append(f"- host time per stage per step: {over + ' ' if over else ''}({bench.sources['stage_overhead']})")
        if bench.hands_over_on_gpu and bench.model.num_layers > 1:
            lines.append(f"- host time per stage per step, GPU time in (hidden under a longer GPU step): "
                         f"{_stage_host(bench)}")
        link = f"{cal.link_Bps / 1e9:.2f} GB/s " if cal.link_Bps else ""
        unused = "; not used: activations stay on the GPU" if bench.hands_over_on_gpu else ""
        lines.append(f"- local link: {link}({bench.sources['link_Bps']}{unused})")
    lines += [f"- micro_batches: {bench.micro_batches or 'one per stage'} ({bench.sources['micro_batches']}); "
              f"max_step_tokens {bench.step_tokens} ({bench.sources['max_step_tokens']}); gather_prompts "
              f"{'on' if bench.gather_prompts else 'off'}",
              _entry_text(bench), "",
              "| stages | conc | tok/s pred | tok/s meas | ratio | TTFT p50 ms pred | meas | ratio | ITL p50 ms pred | meas | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, m, q = r["predicted"], r["measured"] or {}, r["ratio"]
        lines.append(f"| {r['stages']} | {r['concurrency']} | {p['tokens_per_s']:.1f} | {_fmt(m.get('tokens_per_s'))} | "
                     f"{_fmt_ratio(q['tokens_per_s'])} | {p['ttft_p50_s'] * 1e3:.1f} | {_fmt(m.get('ttft_p50_s'), 1e3)} | "
                     f"{_fmt_ratio(q['ttft_p50_s'])} | {p['itl_p50_s'] * 1e3:.2f} | {_fmt(m.get('itl_p50_s'), 1e3, 2)} | "
                     f"{_fmt_ratio(q['itl_p50_s'])} |")
    ok, total = within(rows)
    lines += ["", f"within {TARGET:.0%}: {ok} of {total} medians (bold: outside)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench_json", type=Path, nargs="+", help="bench files; the first one's engine rows calibrate")
    ap.add_argument("--frontend", default="http", help="which serve rows to compare (bench_serve's front end)")
    ap.add_argument("--arrival", default="burst", choices=("burst", "staggered"),
                    help="which serve rows to compare (bench_serve --arrival): the simulated clients send their "
                    "first requests as the measured ones did")
    ap.add_argument("--calibration", type=Path, help="a node calibration (tools/calibrate_node.py --json, or a "
                    "node's calibration.json): its quantities come before the bench's engine rows")
    ap.add_argument("--stage-overhead-ms", help="ROWS:MS,... host time per stage per step, when nothing measured it")
    ap.add_argument("--link-gbps", type=float, help="local link GB/s, when nothing measured it")
    ap.add_argument("--entry-ms", type=float, help="serial entry work per arriving request (front end, dispatch)")
    ap.add_argument("--entry-done-ms", type=float, help="serial entry work per finished request (its end)")
    ap.add_argument("--entry-latency-ms", type=float, help="a request's way in and its first token's way out, "
                    "beyond the serial entry work (not serial: it shifts the TTFT)")
    ap.add_argument("--separate-devices", action="store_true", help="the stages did not share one device")
    ap.add_argument("--host-handoff", action="store_true", help="the stages handed their steps over through the "
                    "host, waiting for the GPU (runs before the GPU handoff: run 9 and earlier)")
    ap.add_argument("--stages", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, help="simulated requests where no measured row gives the count "
                    "(default 16 x concurrency)")
    ap.add_argument("--json", type=Path, help="also write the comparison as JSON here")
    args = ap.parse_args(argv)
    where = args.bench_json[0]
    try:
        docs = [json.loads(p.read_text()) for p in args.bench_json]
        cal = _calibration_file(args.calibration) if args.calibration else None
        bench = read_bench(docs[0], where.name, frontend=args.frontend, arrival=args.arrival, calibration=cal,
                           calibration_name=str(args.calibration), stage_overhead_ms=args.stage_overhead_ms,
                           link_gbps=args.link_gbps, entry_ms=args.entry_ms, entry_latency_ms=args.entry_latency_ms,
                           entry_done_ms=args.entry_done_ms,
                           shared_device=not args.separate_devices)
        more = [m for d in docs[1:] for m in read_bench(d, frontend=args.frontend, arrival=args.arrival).layouts]
        bench = estimate_entries(replace(bench, layouts=bench.layouts + tuple(more), gpu_handoff=not args.host_handoff))
        rows = compare(bench, args.stages, args.concurrency, args.requests)
    except (OSError, ValueError, KeyError, TypeError, CalibrationError) as e:
        where = args.calibration if args.calibration and isinstance(e, CalibrationError) else where
        print(f"plan_vs_measured: {where}: {e}", file=sys.stderr)
        return 2
    print(markdown(bench, rows))
    if args.json:
        args.json.write_text(json.dumps({"sources": bench.sources, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

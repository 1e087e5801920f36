"""Measured engine speed of one device on the served model, as the planner uses it.

A node times its own engine (``hexswarm.swarm.calibrate``): the model's first
``layers`` layers (all when they fit) with embedding and lm_head on one device,
a decode step at a few batch sizes (at a known context length) and
a prefill. The planner does not use these numbers directly as stage times,
because a stage holds only some layers, maybe at a TP degree: it divides each
measurement by what the analytic roofline predicts for the same run, and
multiplies every analytic stage time on that device by this ratio
(interpolated in log B between measured batch sizes, held flat outside;
a prompt step of n tokens takes max(one prompt's time, the full step's time
x n / its tokens; a step mixing decode rows and prompt tokens, with the
``mixed`` point, the rows' decode step plus each prompt token at the measured
cost of one riding on them), see ``cost.CalibrationRatios``).
So the measurement corrects the analytic model's efficiencies and fixed
overheads, and the analytic model keeps the shape (layers, TP, context).

Wire / dict form (what the node gossips in its record's ``calibration`` field;
``parse_calibration`` refuses anything else)::

    {"decode": [[1, 0.00568], [8, 0.0061], [32, 0.0070]],   # [batch, seconds per step], batch ascending
     "context": 160,                 # tokens of context per row during the decode steps
     "prefill_tokens_per_s": 21000.0,  # prompt tokens per second, batch 1
     "prompt": 128,                  # prompt length of the prefill measurement
     "layers": 32,                   # layers measured (with embedding and lm_head); optional, 0 or absent: all
     # optional (absent: not measured, the planner falls back to the analytic model / zero):
     "prefill_batch": [2048, 0.0453],  # [prompt tokens, seconds] of one forward of several prompts (a full step)
     "stage_overhead": [[1, 7e-4], [8, 8e-4], [32, 1e-3]],  # [rows, seconds]: host time one stage adds to a
                                     # step of a pipeline of several stages (launch, wait, link hand-off), beyond GPU
     "stage_host": [[1, 9e-4], [8, 1e-3], [32, 1.2e-3]],  # [rows, seconds] (v3): a stage's whole host time per
                                     # step, GPU work included only where it is shorter (1-layer stages)
     "link_Bps": 2.5e9,              # local link: activation bytes/s, device -> socket -> device
     "mixed": [32, 128, 0.0086],     # [decode rows, prompt tokens, seconds] of one step mixing them (chunked
                                     # prefill: the prompt rides on the decode rows' weight reads)
     "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "model": "<fingerprint>"}   # informational

The optional quantities describe the runtime, not the kernels: with several stages on
one host each step of a stage pays host work that a one-stage CUDA pipeline hides
behind the GPU (it launches step k+1 before reading step k); ``stage_overhead`` is
that work per stage, measured on the node's own serving engine (two stages handing
steps over a local link, minus their GPU time).  That difference is what a stage adds
when its host waits for its GPU before handing on.  Stages that share one GPU hand over
on the GPU (runtime/gpu_handoff.py) and never wait for it: there a stage turns a step
in max(its GPU time, its host time), and ``stage_host`` (added in node calibration
v3) is that host time: half the step of two 1-layer stages, whose GPU work is far
shorter than their host work.  A v2 record has only ``stage_overhead``; the planner then
adds the measurement's own GPU time back (``RooflineTimer``).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Mapping

MAX_POINTS = 16  # a handful of batch sizes is enough; bounds what a peer can make us store
MAX_BATCH_MEASURED = 1 << 16
MAX_TEXT = 128


class CalibrationError(ValueError):
    """A calibration value that is not of the documented shape."""


@dataclass(frozen=True)
class Calibration:
    decode: tuple[tuple[int, float], ...]  # (batch, seconds per decode step), batch strictly ascending
    context: int  # context tokens per row during the decode measurement
    prefill_tokens_per_s: float
    prompt: int  # prompt tokens of the prefill measurement
    layers: int = 0  # layers measured, with embedding and lm_head (0: all of the model's)
    prefill_batch: tuple[int, float] | None = None  # (prompt tokens, seconds) of one batched prefill forward
    stage_overhead: tuple[tuple[int, float], ...] = ()  # (rows, host seconds a stage adds per step), rows ascending
    stage_host: tuple[tuple[int, float], ...] = ()  # (rows, a stage's host seconds per step, hidden by longer GPU work)
    link_Bps: float | None = None  # local link bytes/s for activations (device to device through a socket)
    mixed: tuple[int, int, float] | None = None  # (decode rows, prompt tokens, seconds) of one mixed step
    device: str = ""
    dtype: str = ""
    model: str = ""

    def decode_s(self, batch: float) -> float:
        """Measured seconds per decode step at ``batch`` rows, linear in B between points, flat outside."""
        return _interp([b for b, _ in self.decode], [t for _, t in self.decode], batch, log_x=False)

    @property
    def prefill_s(self) -> float:
        return self.prompt / self.prefill_tokens_per_s

    def overhead_s(self, rows: float) -> float:
        """Host seconds one stage adds to a step of ``rows`` rows (0 when not measured)."""
        if not self.stage_overhead:
            return 0.0
        return _interp([b for b, _ in self.stage_overhead], [t for _, t in self.stage_overhead], rows, log_x=False)

    def host_s(self, rows: float) -> float | None:
        """A stage's host seconds per step at ``rows`` rows (None when not measured: a v2 record)."""
        if not self.stage_host:
            return None
        return _interp([b for b, _ in self.stage_host], [t for _, t in self.stage_host], rows, log_x=False)

    def to_json(self) -> dict[str, Any]:
        out = {"decode": [[b, t] for b, t in self.decode], "context": self.context,
               "prefill_tokens_per_s": self.prefill_tokens_per_s, "prompt": self.prompt, "layers": self.layers,
               "device": self.device, "dtype": self.dtype, "model": self.model}
        if self.prefill_batch is not None:
            out["prefill_batch"] = list(self.prefill_batch)
        if self.stage_overhead:
            out["stage_overhead"] = [[r, t] for r, t in self.stage_overhead]
        if self.stage_host:
            out["stage_host"] = [[r, t] for r, t in self.stage_host]
        if self.link_Bps is not None:
            out["link_Bps"] = self.link_Bps
        if self.mixed is not None:
            out["mixed"] = list(self.mixed)
        return out


def _interp(xs: list[float], ys: list[float], x: float, *, log_x: bool) -> float:
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1 = xs[i - 1], xs[i]
    if log_x:
        w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    else:
        w = (x - x0) / (x1 - x0)
    return ys[i - 1] + w * (ys[i] - ys[i - 1])


def interp_log(xs: list[float], ys: list[float], x: float) -> float:
    """Linear in log x between points, flat outside (ratios vary smoothly over batch sizes 1..256)."""
    return _interp(xs, ys, x, log_x=True)


def _positive_number(v: Any, what: str, upper: float = 1e12) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= upper:
        raise CalibrationError(f"{what} must be a positive finite number, got {v!r}")
    return float(v)


def _positive_int(v: Any, what: str, upper: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= upper:
        raise CalibrationError(f"{what} must be an integer in [1, {upper}], got {v!r}")
    return v


def _text(v: Any, what: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str) or len(v) > MAX_TEXT:
        raise CalibrationError(f"{what} must be a string of at most {MAX_TEXT} characters")
    return v


def _pair(p: Any, what: str, upper_int: int) -> tuple[int, float]:
    if not isinstance(p, (list, tuple)) or len(p) != 2:
        raise CalibrationError(f"calibration {what} entries must be [count, seconds]")
    return _positive_int(p[0], f"{what} count", upper_int), _positive_number(p[1], f"{what} seconds", 3600.0)


def _mixed(v: Any) -> tuple[int, int, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        raise CalibrationError("calibration mixed must be [decode rows, prompt tokens, seconds]")
    return (_positive_int(v[0], "mixed decode rows", MAX_BATCH_MEASURED), _positive_int(v[1], "mixed prompt tokens", 1 << 22),
            _positive_number(v[2], "mixed seconds", 3600.0))


def _points(v: Any, what: str) -> tuple[tuple[int, float], ...]:
    """[[count, seconds], ...]: 1..MAX_POINTS pairs, counts strictly ascending."""
    if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= MAX_POINTS:
        raise CalibrationError(f"calibration {what} must be a list of 1..{MAX_POINTS} [count, seconds] pairs")
    out = tuple(_pair(p, what, MAX_BATCH_MEASURED) for p in v)
    if any(b1 <= b0 for (b0, _), (b1, _) in zip(out, out[1:])):
        raise CalibrationError(f"calibration {what} counts must be strictly ascending")
    return out


def parse_calibration(d: Any) -> Calibration:
    """A ``Calibration`` from its dict form; ``CalibrationError`` on any malformed value."""
    if not isinstance(d, Mapping):
        raise CalibrationError("calibration must be a map")
    optional = {k: d.get(k) for k in ("prefill_batch", "stage_overhead", "stage_host", "link_Bps", "mixed")}
    return Calibration(
        decode=_points(d.get("decode"), "decode"),
        prefill_batch=None if optional["prefill_batch"] is None else _pair(optional["prefill_batch"], "prefill_batch", 1 << 22),
        stage_overhead=() if optional["stage_overhead"] is None else _points(optional["stage_overhead"], "stage_overhead"),
        stage_host=() if optional["stage_host"] is None else _points(optional["stage_host"], "stage_host"),
        link_Bps=None if optional["link_Bps"] is None else _positive_number(optional["link_Bps"], "link_Bps"),
        mixed=None if optional["mixed"] is None else _mixed(optional["mixed"]),
        context=_positive_int(d.get("context"), "calibration context", 1 << 22),
        prefill_tokens_per_s=_positive_number(d.get("prefill_tokens_per_s"), "prefill_tokens_per_s"),
        prompt=_positive_int(d.get("prompt"), "calibration prompt", 1 << 22),
        layers=0 if d.get("layers") in (None, 0) else _positive_int(d.get("layers"), "calibration layers", 1 << 12),
        device=_text(d.get("device"), "calibration device"),
        dtype=_text(d.get("dtype"), "calibration dtype"),
        model=_text(d.get("model"), "calibration model"),
    )

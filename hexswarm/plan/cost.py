"""Per-stage time and memory of a pipeline stage, and the hops between stages.

Two models share one interface (``CostModel``) so that the search runs on either:

* ``RooflineCostModel`` — the one the planner uses: per GPU kind, time =
  max(FLOPs / FLOP/s, bytes streamed / memory bandwidth), real GQA/SwiGLU
  parameter counts, KV cache divided over the TP group, embedding/lm_head on
  the first/last stage leader (as the runtime places them).
* ``PrototypeCostModel`` — the deleted HexGen prototype's formulas and constants
  (research notes 1.2), kept only to reproduce its reference table in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from typing import Callable, Protocol

from hexswarm.plan.calibration import interp_log
from hexswarm.plan.cluster import GIB, GpuKind, Link
from hexswarm.plan.model_spec import ModelSpec
from hexswarm.plan.workload import Workload


@dataclass(frozen=True)
class StageCost:
    prefill_s: float  # the prompt of one micro-batch through the stage, TP all-reduces included
    decode_s: float  # one decode step (one token per sequence), TP all-reduces included
    memory_bytes: int  # peak on the stage's busiest GPU (its leader)

    def busy_s(self, decode_steps: int) -> float:
        """How long one request (micro-batch) occupies this stage in total."""
        return self.prefill_s + decode_steps * self.decode_s


@dataclass(frozen=True)
class HopCost:
    prefill_s: float  # activations of the whole prompt, leader to leader, then broadcast in the next TP group
    decode_s: float  # one token's activations (or, for the closing hop, the sampled token back to stage 0)


class CostModel(Protocol):
    model: ModelSpec
    prompt_len: float  # mean prompt tokens the stage and hop costs assume
    decode_steps: int  # decode passes per request after the prefill
    max_inflight: int  # micro-batches one replica pipelines at once (each keeps its own KV cache)

    def stage(self, kind: GpuKind, tp: int, layers: int, intra: Link, *, first: bool, last: bool, batch: int = 1) -> StageCost: ...

    def hop(self, link: Link, tp_next: int, intra_next: Link, *, batch: int = 1) -> HopCost: ...

    def token_return(self, link: Link, *, batch: int = 1) -> float: ...

    def with_lengths(self, prompt_len: float, output_len: float) -> "CostModel": ...


def ring_allreduce_s(link: Link, tp: int, nbytes: float) -> float:
    """Ring all-reduce of ``nbytes`` over ``tp`` GPUs: 2(tp-1) steps of nbytes/tp."""
    if tp <= 1:
        return 0.0
    return 2 * (tp - 1) * (link.latency_s + nbytes / (tp * link.bandwidth_Bps))


@dataclass(frozen=True)
class StepShape:
    """What one engine step pushes through a stage: decode rows (one new token each) plus
    a chunk of prompt tokens (chunked prefill), and how much KV cache that touches."""

    decode_rows: float = 0.0
    prefill_tokens: float = 0.0
    attn_pairs: float = 0.0  # sum over the new tokens of the context each attends to
    kv_tokens: float = 0.0  # KV entries read (decode rows: their whole context) or written (prompt tokens)
    rows_out: float = 0.0  # rows whose last position goes through lm_head on the last stage

    @classmethod
    def decode(cls, rows: float, context_per_row: float) -> "StepShape":
        return cls(decode_rows=rows, attn_pairs=rows * context_per_row, kv_tokens=rows * context_per_row, rows_out=rows)

    @classmethod
    def prefill(cls, rows: float, prompt_len: float, done: float = 0.0) -> "StepShape":
        """``prompt_len`` new prompt tokens per row after ``done`` already cached ones (causal attention)."""
        pairs = prompt_len * done + prompt_len * prompt_len / 2
        return cls(prefill_tokens=rows * prompt_len, attn_pairs=rows * pairs, kv_tokens=rows * (prompt_len + done), rows_out=rows)

    def __add__(self, other: "StepShape") -> "StepShape":
        return StepShape(self.decode_rows + other.decode_rows, self.prefill_tokens + other.prefill_tokens,
                         self.attn_pairs + other.attn_pairs, self.kv_tokens + other.kv_tokens, self.rows_out + other.rows_out)

    @property
    def new_tokens(self) -> float:
        return self.decode_rows + self.prefill_tokens


@dataclass(frozen=True)
class RooflineCostModel:
    """Time of one engine step on a stage = max(FLOPs / achieved FLOP/s, bytes / achieved
    bandwidth): the weight shard is read once per step whatever the batch, each row
    reads its own KV cache, and every new token costs 2 FLOPs per weight. A device
    with a ``calibration`` scales this by its measured / analytic ratio."""

    model: ModelSpec
    prompt_len: float  # mean prompt tokens
    output_len: float  # mean generated tokens
    max_context: int  # prompt + output, for KV sizing
    max_batch: int = 1  # KV slots of a replica: requests it holds at once (continuous batching)
    max_inflight: int = 8  # micro-batches in flight per replica (the fluid simulator's pipelining cap)
    compute_efficiency: float = 0.5  # achieved / peak dense FLOP/s
    bandwidth_efficiency: float = 0.8  # achieved / peak memory bandwidth
    reserved_bytes: int = GIB // 2  # CUDA context, allocator slack, workspaces
    step_tokens: int = 2048  # token budget of one engine step (chunked prefill): bounds the activations

    @classmethod
    def for_workload(cls, model: ModelSpec, workload: Workload, **kw) -> "RooflineCostModel":
        return cls(model, workload.prompt.mean, workload.output.mean, workload.max_context, workload.max_batch, **kw)

    def with_lengths(self, prompt_len: float, output_len: float) -> "RooflineCostModel":
        return replace(self, prompt_len=prompt_len, output_len=output_len)

    def with_max_batch(self, max_batch: int) -> "RooflineCostModel":
        return replace(self, max_batch=max_batch)

    @property
    def decode_steps(self) -> int:
        # The prefill pass already yields the first token.
        return max(0, round(self.output_len) - 1)

    def analytic_step_s(self, kind: GpuKind, tp: int, layers: int, *, last: bool, shape: StepShape) -> float:
        """Roofline time of one step on the stage's leader, without TP all-reduces and calibration."""
        return self.step_model(kind, tp, layers, None, last).analytic_s(shape)

    def step_s(self, kind: GpuKind, tp: int, layers: int, intra: Link, *, last: bool, shape: StepShape) -> float:
        """One engine step on the stage: compute/memory roofline (calibrated), plus two all-reduces per layer."""
        return self.step_model(kind, tp, layers, intra, last).seconds(shape)

    def step_model(self, kind: GpuKind, tp: int, layers: int, intra: Link | None, last: bool) -> "StageStepModel":
        """The stage's step time as a few coefficients (cached: the simulator asks once per step)."""
        return _step_model(self.analytic_core(), kind, tp, layers, intra, last)

    def calibration_scale(self, kind: GpuKind, shape: StepShape) -> float:
        """Measured / analytic on this device (1 without a calibration), mixed by token share for mixed steps
        (used for those only when the calibration has no mixed point: see StageStepModel.seconds)."""
        if kind.calibration is None or shape.new_tokens <= 0:
            return 1.0
        ratios = calibration_ratios(self.analytic_core(), kind)
        dec = ratios.decode(shape.decode_rows) if shape.decode_rows else 0.0
        pre = ratios.prefill(shape.prefill_tokens) if shape.prefill_tokens else 0.0
        return (shape.decode_rows * dec + shape.prefill_tokens * pre) / shape.new_tokens

    @cached_property
    def _core(self) -> "RooflineCostModel":
        return replace(self, prompt_len=1.0, output_len=1.0, max_context=1, max_batch=1)

    def analytic_core(self) -> "RooflineCostModel":
        """This model with the workload fields normalised: the key of per-stage step models and calibration ratios."""
        return self._core

    def stage(self, kind: GpuKind, tp: int, layers: int, intra: Link, *, first: bool, last: bool, batch: int = 1) -> StageCost:
        ctx = self.prompt_len + self.output_len / 2  # mean context over the generation
        prefill = self.step_s(kind, tp, layers, intra, last=last, shape=StepShape.prefill(batch, self.prompt_len))
        decode = self.step_s(kind, tp, layers, intra, last=last, shape=StepShape.decode(batch, ctx))
        return StageCost(prefill, decode, self.memory_bytes(tp, layers, first=first, last=last))

    def memory_bytes(self, tp: int, layers: int, *, first: bool, last: bool) -> int:
        """Peak bytes on the stage leader: weight shard, KV shard of every slot, activations, embedding/lm_head, reserve."""
        m, B = self.model, self.model.bytes_per_param
        weights = layers * m.layer_weight_bytes / tp
        kv = layers * self.max_batch * self.max_context * m.kv_bytes_per_token_per_layer(tp)
        # Activations of one layer for one step's tokens (the step token budget bounds a prefill chunk):
        # residual, normed input, q/k/v/attn out, gate/up/act of the MLP shard.
        tokens = min(self.max_batch * self.max_context, max(self.step_tokens, self.max_context))
        act = tokens * (4 * m.hidden_size + (m.q_size + 2 * m.kv_size) / tp + 3 * m.intermediate_size / tp) * B
        extra = (m.embedding_params * B if first else 0) + (m.head_params * B + self.max_batch * m.vocab_size * 4 if last else 0)
        return int(weights + kv + act + extra + self.reserved_bytes)

    def activation_hop_s(self, link: Link, tp_next: int, intra_next: Link, tokens: float) -> float:
        """Activations of ``tokens`` new tokens, leader to leader, then broadcast inside the next TP group."""
        fixed, per_token = self.hop_coefficients(link, tp_next, intra_next)
        return fixed + per_token * tokens

    def hop_coefficients(self, link: Link, tp_next: int, intra_next: Link) -> tuple[float, float]:
        """(seconds, seconds per token) of a hop: it is linear in the tokens sent."""
        token_bytes = self.model.hidden_size * self.model.bytes_per_param
        if tp_next <= 1:
            return link.latency_s, token_bytes / link.bandwidth_Bps
        return (link.latency_s + (tp_next - 1) * intra_next.latency_s,
                token_bytes / link.bandwidth_Bps + token_bytes / intra_next.bandwidth_Bps)

    def hop(self, link: Link, tp_next: int, intra_next: Link, *, batch: int = 1) -> HopCost:
        return HopCost(self.activation_hop_s(link, tp_next, intra_next, batch * self.prompt_len),
                       self.activation_hop_s(link, tp_next, intra_next, batch))

    def token_return(self, link: Link, *, batch: int = 1) -> float:
        return link.transfer_s(8 * batch)  # int64 token ids, last stage -> first


@dataclass(frozen=True)
class StageStepModel:
    """Step time of one stage, reduced to coefficients of the step's shape:
    max(flops_per_token * tokens + flops_per_pair * pairs, weight_bytes + kv_bytes_per_token * kv_tokens) / rates,
    plus lm_head on the last stage, times the calibration scale, plus the TP all-reduces."""

    cost: RooflineCostModel
    kind: GpuKind
    flops_per_token: float
    flops_per_pair: float
    weight_bytes: float
    kv_bytes_per_token: float
    flops_rate: float
    bytes_rate: float
    head_flops_per_row: float  # 0 unless the stage holds lm_head
    head_bytes: float
    allreduce: tuple[float, float]  # (fixed, per new token) seconds of the stage's all-reduces

    def analytic_s(self, shape: StepShape) -> float:
        t = max((self.flops_per_token * shape.new_tokens + self.flops_per_pair * shape.attn_pairs) / self.flops_rate,
                (self.weight_bytes + self.kv_bytes_per_token * shape.kv_tokens) / self.bytes_rate)
        if self.head_bytes:
            t += max(self.head_flops_per_row * shape.rows_out / self.flops_rate, self.head_bytes / self.bytes_rate)
        return t

    def prompt_compute_s(self, shape: StepShape) -> float:
        """The analytic compute time of the step's prompt tokens (their matmuls)."""
        return self.flops_per_token * shape.prefill_tokens / self.flops_rate

    def seconds(self, shape: StepShape) -> float:
        ratios = None
        if self.kind.calibration is not None and shape.decode_rows and shape.prefill_tokens:
            ratios = calibration_ratios(self.cost, self.kind)
        if ratios is not None and ratios.mixed_token_ratio is not None:
            # a mixed step: the decode rows' step, plus each prompt token at the measured cost of one riding
            # on decode rows (CalibrationRatios.mixed_token_ratio); grows with both rows and prompt tokens
            t = (self.analytic_s(replace(shape, prefill_tokens=0.0)) * ratios.decode(shape.decode_rows)
                 + self.prompt_compute_s(shape) * ratios.mixed_token_ratio)
        else:
            t = self.analytic_s(shape)
            if self.kind.calibration is not None:
                t *= self.cost.calibration_scale(self.kind, shape)
        fixed, per_token = self.allreduce
        return t + (fixed + per_token * shape.new_tokens if fixed or per_token else 0.0)


@lru_cache(maxsize=65536)
def _step_model(core: RooflineCostModel, kind: GpuKind, tp: int, layers: int, intra: Link | None, last: bool) -> StageStepModel:
    m, B = core.model, core.model.bytes_per_param
    P = m.params_per_layer
    if intra is None or tp <= 1:
        allreduce = (0.0, 0.0)
    else:  # 2 per layer, each a ring of 2(tp-1) steps of (latency + bytes/tp / bandwidth)
        allreduce = (2 * layers * 2 * (tp - 1) * intra.latency_s,
                     2 * layers * 2 * (tp - 1) * m.hidden_size * B / (tp * intra.bandwidth_Bps))
    return StageStepModel(
        cost=core, kind=kind,
        # Matmuls: 2 FLOPs per weight per new token; attention: QK^T and AV, 4 q_size FLOPs per (token, context) pair.
        flops_per_token=layers * 2 * P / tp, flops_per_pair=layers * 4 * m.q_size / tp,
        weight_bytes=layers * m.layer_weight_bytes / tp, kv_bytes_per_token=layers * m.kv_bytes_per_token_per_layer(tp),
        flops_rate=kind.tflops * 1e12 * core.compute_efficiency, bytes_rate=kind.mem_bw_Bps * core.bandwidth_efficiency,
        head_flops_per_row=2 * m.head_params if last else 0.0, head_bytes=m.head_params * B if last else 0.0,
        allreduce=allreduce,
    )


@dataclass(frozen=True)
class CalibrationRatios:
    """Measured / analytic of one calibrated device, by step shape.

    Decode: the ratio at each measured batch size, interpolated in log rows (flat outside).

    Prefill: the measured time of a step of ``n`` prompt tokens, divided by the analytic time of the
    same step.  With one point (one prompt of ``prompt`` tokens: ``one_prompt_s``) the ratio is that
    point's, whatever ``n``.  With a full step too (``full``: ``(n2, t2)``, several prompts in one
    forward) a step of ``n`` tokens takes ``max(one_prompt_s, t2 * n / n2)``: a small step costs about
    what one prompt costs (bound by reading the weights, and by launches where it runs eagerly; up to
    512 prompt tokens the engine replays a CUDA graph) and a large one the GPU's compute time, which
    grows with the tokens (a full step is compute-bound).  Both measured points are reproduced exactly."""

    batches: tuple[float, ...]
    decode_ratio: tuple[float, ...]
    one_prompt_s: float
    prompt: float
    full: tuple[float, float] | None
    analytic_prefill: Callable[[float], float]  # analytic seconds of a step of n prompt tokens (prompts of `prompt`)
    # Mixed steps (decode rows + prompt tokens, with the calibration's `mixed` point): the measured seconds a prompt
    # token adds to a decode step over its analytic compute time (StageStepModel.seconds); None: not measured, the
    # step is priced by the token-share blend of calibration_scale
    mixed_token_ratio: float | None = None

    def decode(self, rows: float) -> float:
        return interp_log(list(self.batches), list(self.decode_ratio), max(rows, 1.0))

    def prefill_s(self, tokens: float) -> float:
        """The calibration's own time for a step of ``tokens`` prompt tokens (its layers, TP 1, lm_head)."""
        if self.full is None:
            return self.one_prompt_s * self.analytic_prefill(tokens) / self.analytic_prefill(self.prompt)
        n2, t2 = self.full
        return max(self.one_prompt_s, t2 * tokens / n2)

    def prefill(self, tokens: float) -> float:
        tokens = max(tokens, 1.0)
        if self.full is None:
            return self.one_prompt_s / self.analytic_prefill(self.prompt)
        return self.prefill_s(tokens) / self.analytic_prefill(tokens)


@lru_cache(maxsize=256)
def calibration_ratios(core: RooflineCostModel, kind: GpuKind) -> CalibrationRatios:
    """Measured / analytic ratios of a calibrated device (``CalibrationRatios``): the measurement ran the
    first ``cal.layers`` layers (all when 0) with embedding and lm_head at TP 1 on it."""
    cal = kind.calibration
    assert cal is not None
    L = min(cal.layers, core.model.num_layers) if cal.layers else core.model.num_layers

    def analytic(shape: StepShape) -> float:
        return core.analytic_step_s(kind, 1, L, last=True, shape=shape)

    def analytic_prefill(tokens: float) -> float:  # prompts of cal.prompt tokens, as the node measured them
        return analytic(StepShape.prefill(tokens / cal.prompt, cal.prompt))

    ratios = tuple(t / analytic(StepShape.decode(b, cal.context)) for b, t in cal.decode)
    batches = tuple(float(b) for b, _ in cal.decode)
    full = None
    if cal.prefill_batch is not None and cal.prefill_batch[0] > cal.prompt:
        full = (float(cal.prefill_batch[0]), cal.prefill_batch[1])
    mixed = None
    if cal.mixed is not None:  # split as StageStepModel.seconds splits, so the measured step is reproduced
        rows, tokens, t = cal.mixed
        shape = StepShape.decode(rows, cal.context) + StepShape.prefill(1, tokens)
        step = core.step_model(kind, 1, L, None, True)
        decode_s = step.analytic_s(replace(shape, prefill_tokens=0.0)) * interp_log(list(batches), list(ratios), rows)
        mixed = max(0.0, t - decode_s) / step.prompt_compute_s(shape)
    return CalibrationRatios(batches, ratios, cal.prefill_s, float(cal.prompt), full, analytic_prefill, mixed)


@dataclass(frozen=True)
class PrototypeCostModel:
    """The prototype's formulas (research notes 1.2), bugs and all: one constant
    m_d for FLOP/s and B/s, 12H^2 parameters per layer, KV not divided by TP,
    compute = weight streaming + FLOPs (added, not max), s_out - s_in decode steps,
    one PP charge per hop per request."""

    model: ModelSpec
    s_in: int = 32
    s_out: int = 128
    batch: int = 1
    alpha: float = 1e-6
    beta: float = 1e11
    m_d: float = 1e12
    max_inflight: int = 1

    @classmethod
    def full_budget(cls, model: ModelSpec) -> "PrototypeCostModel":
        return cls(model)

    @classmethod
    def half_budget(cls, model: ModelSpec) -> "PrototypeCostModel":
        return cls(model, alpha=1e-3, beta=1e9)

    def with_lengths(self, prompt_len: float, output_len: float) -> "PrototypeCostModel":
        return replace(self, s_in=int(prompt_len), s_out=int(output_len))

    @property
    def decode_steps(self) -> int:
        return self.s_out - self.s_in

    @property
    def prompt_len(self) -> float:
        return float(self.s_in)

    @property
    def _link(self) -> Link:
        return Link(self.alpha, self.beta)

    def _h2(self) -> float:
        return float(self.model.hidden_size) ** 2

    def compute_s(self, tp: int, layers: int) -> tuple[float, float]:
        """(prompt, per decode token) compute of a stage, divided by TP (comp = 1)."""
        H2, B, b = self._h2(), self.model.bytes_per_param, self.batch
        c_p = layers * (12 * H2 * B / self.m_d + 24 * b * self.s_in * H2 / self.m_d)
        c_t = layers * (12 * H2 * B / self.m_d + 24 * b * H2 / self.m_d)
        return c_p / tp, c_t / tp

    def tp_comm_s(self, tp: int, layers: int, tokens: int) -> float:
        nbytes = self.batch * tokens * self.model.hidden_size * self.model.bytes_per_param
        return ring_allreduce_s(self._link, tp, nbytes) * 2 * layers

    def memory_bytes(self, tp: int, layers: int) -> int:
        H, B, b, s = self.model.hidden_size, self.model.bytes_per_param, self.batch, self.s_in + self.s_out
        return int(layers * (12 * H * H * B / tp + 2 * b * s * H * B) + 4 * b * s * H * B)

    def stage(self, kind: GpuKind, tp: int, layers: int, intra: Link, *, first: bool, last: bool, batch: int = 1) -> StageCost:
        c_p, c_t = self.compute_s(tp, layers)
        return StageCost(c_p + self.tp_comm_s(tp, layers, self.s_in), c_t + self.tp_comm_s(tp, layers, 1), self.memory_bytes(tp, layers))

    def hop(self, link: Link, tp_next: int, intra_next: Link, *, batch: int = 1) -> HopCost:
        H, B, b = self.model.hidden_size, self.model.bytes_per_param, self.batch
        m = b * self.s_in * H * B
        pp = self.alpha + m / self.beta
        if tp_next > 1:
            pp += 2 * (tp_next - 1) * (self.alpha + m / (tp_next * self.beta))
        return HopCost(pp, 0.0)

    def token_return(self, link: Link, *, batch: int = 1) -> float:
        return 0.0


def request_latency_s(cost: CostModel, stages: list[StageCost], hops: list[HopCost], token_return_s: float) -> float:
    """Unloaded end-to-end time of one request: prefill through every stage, then
    ``decode_steps`` passes around the pipeline (the sampled token goes back to stage 0)."""
    prefill = sum(s.prefill_s for s in stages) + sum(h.prefill_s for h in hops)
    step = sum(s.decode_s for s in stages) + sum(h.decode_s for h in hops) + (token_return_s if len(stages) > 1 else 0.0)
    return prefill + cost.decode_steps * step

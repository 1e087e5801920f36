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
from typing import Protocol

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
class RooflineCostModel:
    model: ModelSpec
    prompt_len: float  # mean prompt tokens
    output_len: float  # mean generated tokens
    max_context: int  # prompt + output, for KV sizing
    max_batch: int = 1  # sequences per micro-batch
    max_inflight: int = 8  # micro-batches in flight per replica: KV is sized for max_batch x max_inflight
    compute_efficiency: float = 0.5  # achieved / peak dense FLOP/s
    bandwidth_efficiency: float = 0.8  # achieved / peak memory bandwidth
    reserved_bytes: int = GIB // 2  # CUDA context, allocator slack, workspaces

    @classmethod
    def for_workload(cls, model: ModelSpec, workload: Workload, **kw) -> "RooflineCostModel":
        return cls(model, workload.prompt.mean, workload.output.mean, workload.max_context, workload.max_batch, **kw)

    def with_lengths(self, prompt_len: float, output_len: float) -> "RooflineCostModel":
        return replace(self, prompt_len=prompt_len, output_len=output_len)

    @property
    def decode_steps(self) -> int:
        # The prefill pass already yields the first token.
        return max(0, round(self.output_len) - 1)

    def _time(self, kind: GpuKind, flops: float, nbytes: float) -> float:
        return max(flops / (kind.tflops * 1e12 * self.compute_efficiency), nbytes / (kind.mem_bw_Bps * self.bandwidth_efficiency))

    def stage(self, kind: GpuKind, tp: int, layers: int, intra: Link, *, first: bool, last: bool, batch: int = 1) -> StageCost:
        m, B = self.model, self.model.bytes_per_param
        s, b = self.prompt_len, batch
        ctx = self.prompt_len + self.output_len / 2  # mean context over the generation
        w_layer = m.layer_weight_bytes / tp
        kv_tok = m.kv_bytes_per_token_per_layer(tp)
        # Matmuls: 2 FLOPs per weight per token; attention: QK^T and AV over the context (causal halves prefill).
        pre_flops = layers * b * (2 * m.params_per_layer * s + 2 * s * s * m.q_size) / tp
        pre_bytes = layers * (w_layer + b * s * kv_tok)
        dec_flops = layers * b * (2 * m.params_per_layer + 4 * ctx * m.q_size) / tp
        dec_bytes = layers * (w_layer + b * ctx * kv_tok)
        prefill = self._time(kind, pre_flops, pre_bytes)
        decode = self._time(kind, dec_flops, dec_bytes)
        if last:  # final norm + lm_head on the leader: logits of the last position only
            head = m.head_params
            step = self._time(kind, 2 * b * head, head * B)
            prefill += step
            decode += step
        # Two all-reduces per layer (after attention and after the MLP).
        prefill += 2 * layers * ring_allreduce_s(intra, tp, b * s * m.hidden_size * B)
        decode += 2 * layers * ring_allreduce_s(intra, tp, b * m.hidden_size * B)
        return StageCost(prefill, decode, self.memory_bytes(tp, layers, first=first, last=last))

    def memory_bytes(self, tp: int, layers: int, *, first: bool, last: bool) -> int:
        """Peak bytes on the stage leader: weight shard, KV shard, activations, embedding/lm_head, reserve."""
        m, B = self.model, self.model.bytes_per_param
        weights = layers * m.layer_weight_bytes / tp
        kv = layers * self.max_batch * self.max_inflight * self.max_context * m.kv_bytes_per_token_per_layer(tp)
        # Prefill activations of one layer: residual, normed input, q/k/v/attn out, gate/up/act of the MLP shard.
        act = self.max_batch * self.max_context * (4 * m.hidden_size + (m.q_size + 2 * m.kv_size) / tp + 3 * m.intermediate_size / tp) * B
        extra = (m.embedding_params * B if first else 0) + (m.head_params * B + self.max_batch * m.vocab_size * 4 if last else 0)
        return int(weights + kv + act + extra + self.reserved_bytes)

    def hop(self, link: Link, tp_next: int, intra_next: Link, *, batch: int = 1) -> HopCost:
        h = self.model.hidden_size * self.model.bytes_per_param * batch
        pre, dec = h * self.prompt_len, h

        def send(nbytes: float) -> float:
            fan_out = (tp_next - 1) * intra_next.latency_s + nbytes / intra_next.bandwidth_Bps if tp_next > 1 else 0.0
            return link.transfer_s(nbytes) + fan_out

        return HopCost(send(pre), send(dec))

    def token_return(self, link: Link, *, batch: int = 1) -> float:
        return link.transfer_s(8 * batch)  # int64 token ids, last stage -> first


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

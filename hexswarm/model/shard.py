"""Which slice of each weight one tensor-parallel rank owns.

q/k/v and gate/up are split by output rows (column-parallel), o_proj and
down_proj by input columns (row-parallel, followed by an all-reduce).  K/V
heads are split across ranks; when TP exceeds the KV-head count each KV head
is replicated on TP / kv_heads consecutive ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from hexswarm.errors import UserError
from hexswarm.model.config import LlamaConfig


def check_tp_degree(cfg: LlamaConfig, tp: int) -> None:
    if tp < 1:
        raise UserError(f"TP degree must be >= 1, got {tp}")
    if cfg.num_attention_heads % tp:
        raise UserError(f"TP degree {tp} does not divide the {cfg.num_attention_heads} attention heads")
    kv = cfg.num_key_value_heads
    if kv % tp and tp % kv:
        raise UserError(f"TP degree {tp} neither divides nor is a multiple of the {kv} key/value heads")
    if cfg.intermediate_size % tp:
        raise UserError(f"TP degree {tp} does not divide intermediate_size {cfg.intermediate_size}")


@dataclass(frozen=True)
class TensorShard:
    """Row ranges (in units of output features) one rank takes of each projection."""

    tp: int
    rank: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]

    @classmethod
    def for_rank(cls, cfg: LlamaConfig, tp: int, rank: int) -> "TensorShard":
        check_tp_degree(cfg, tp)
        hq = cfg.num_attention_heads // tp
        kv = cfg.num_key_value_heads
        if kv >= tp:
            hkv = kv // tp
            kv_range = (rank * hkv, (rank + 1) * hkv)
        else:
            head = rank * kv // tp
            kv_range = (head, head + 1)
        f = cfg.intermediate_size // tp
        return cls(tp, rank, (rank * hq, (rank + 1) * hq), kv_range, (rank * f, (rank + 1) * f))

    @property
    def n_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

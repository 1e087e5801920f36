"""Token sampling: greedy, temperature, top-k, top-p.

Randomness is counter-based: the uniform draw for step n of a request depends
only on (seed, n).  The same seed therefore gives the same text on any layout,
and a request resumed at step n on another pipeline draws exactly what the
first pipeline would have drawn.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import asdict, dataclass

import torch

from hexswarm.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> "SamplingParams":
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not (0 <= self.seed < 2**63):
            raise UserError(f"--seed must be in [0, 2^63), got {self.seed}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        return cls(
            temperature=float(d.get("temperature", 0.0)),
            top_k=int(d.get("top_k", 0)),
            top_p=float(d.get("top_p", 1.0)),
            seed=int(d.get("seed", 0)),
        ).validate()


def uniform(seed: int, step: int) -> float:
    """A uniform draw in [0, 1) determined by (seed, step) alone."""
    digest = hashlib.blake2b(struct.pack("<QQ", seed & (2**64 - 1), step), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits [V] with every token outside the top-k / top-p sets set to -inf.

    top-k keeps the k highest logits; top-p keeps the smallest set of most
    likely tokens whose probability mass reaches p (the first token always).
    """
    out = logits.clone()
    if top_k and top_k < out.numel():
        kth = torch.topk(out, top_k).indices
        keep = torch.zeros_like(out, dtype=torch.bool)
        keep[kth] = True
        out[~keep] = float("-inf")
    if top_p < 1.0:
        probs = torch.softmax(out.double(), dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted)
        drop[order] = drop_sorted
        out[drop] = float("-inf")
    return out


def sample_token(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """One token from last-position logits [V] (float32)."""
    logits = logits.float().reshape(-1)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    filtered = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(filtered.double(), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    u = uniform(params.seed, step) * float(cdf[-1])
    token = int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype), right=True)[0])
    token = min(token, probs.numel() - 1)
    # never land on a zero-probability token (cdf plateaus at the right edge)
    while probs[token] == 0.0 and token > 0:
        token -= 1
    return token

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

from hexswarm.model.host_copy import to_device
from hexswarm.net.submit_request import check_sampling


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> "SamplingParams":
        """These values checked by the submit request's rules (a FieldError naming the bad one), as those keep
        them: top_k -1 as 0, a negative seed mod 2^63."""
        values = (self.temperature, self.top_k, self.top_p, self.seed)
        checked = check_sampling(*values)
        return self if checked == values else SamplingParams(*checked)  # a stage checks every row's every step

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
    return _filter_rows(logits.reshape(1, -1), [top_k], [top_p])[0]


def sample_token(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """One token from last-position logits [V]: `sample_batch` on one row, so one request
    draws the same token alone as inside any batch."""
    return sample_batch(logits.reshape(1, -1), [params], [step])[0]


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """One token per row of logits [B, V], on the logits' device, with one copy to the host.

    Row b uses params[b] at sampling step steps[b].  Each row's arithmetic is independent of
    the others (row-wise ops in float64), so a request draws the same token at any batch size.
    """
    return sample_on_device(logits, params, steps).tolist()


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> torch.Tensor:
    """`sample_batch` without the copy: the tokens [B] as a long tensor on the logits' device
    (nothing waits for the device: a server feeds them to the next step before reading them)."""
    logits = logits.float()
    B, V = logits.shape
    greedy_tokens = torch.argmax(logits, dim=-1)
    rows = [b for b, p in enumerate(params) if p.temperature != 0.0]
    if not rows:
        return greedy_tokens
    dev = logits.device
    idx = to_device(rows, torch.long, dev)
    sel = [params[b] for b in rows]
    temps = to_device([p.temperature for p in sel], torch.float32, dev)
    scaled = logits.index_select(0, idx) / temps[:, None]
    filtered = _filter_rows(scaled, [p.top_k for p in sel], [p.top_p for p in sel])
    probs = torch.softmax(filtered.double(), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    u = to_device([uniform(p.seed, steps[b]) for p, b in zip(sel, rows)], torch.float64, dev)
    target = (u * cdf[:, -1]).unsqueeze(1)
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=V - 1)
    # never land on a zero-probability token (the cdf plateaus at the right edge): step back to
    # the last token at or before the draw with a non-zero probability (token 0 if none)
    positions = torch.arange(V, device=dev).expand(len(rows), V)
    last_nonzero = torch.where(probs > 0, positions, torch.full_like(positions, -1)).cummax(dim=-1).values
    drawn = last_nonzero.gather(1, drawn[:, None]).squeeze(1).clamp_(min=0)
    return greedy_tokens.index_copy(0, idx, drawn)


def _filter_rows(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """`filter_logits` for every row of [R, V] with its own k and p."""
    R, V = logits.shape
    out = logits.clone()
    dev = logits.device
    k_max = max((k for k in top_k if 0 < k < V), default=0)
    if k_max:
        ks = to_device([k if 0 < k < V else V for k in top_k], torch.long, dev)
        top = torch.topk(out, k_max, dim=-1).indices
        keep = torch.zeros_like(out, dtype=torch.bool)
        keep.scatter_(1, top, torch.arange(k_max, device=dev)[None, :] < ks[:, None])
        keep |= (ks == V)[:, None]  # rows without a top-k cut keep everything
        out.masked_fill_(~keep, float("-inf"))
    if any(p < 1.0 for p in top_p):
        ps = to_device(top_p, torch.float64, dev)
        probs = torch.softmax(out.double(), dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = (mass_before >= ps[:, None]) & (ps < 1.0)[:, None]
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        out.masked_fill_(drop, float("-inf"))
    return out

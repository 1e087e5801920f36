"""Checks on pipeline messages from peers before any of it reaches torch.

Every field a stage uses is checked for type and range, activations for dtype,
shape and finiteness, and the sender against the peer the layout says the
message must come from.  A message that fails is dropped (and logged); the
request it belongs to is then resumed elsewhere by its entry node.
"""

from __future__ import annotations

from typing import Any

import torch

from hexswarm.errors import ProtocolError, UserError
from hexswarm.model.config import LlamaConfig
from hexswarm.runtime.sampling import SamplingParams
from hexswarm.swarm.layout import SwarmLayout

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_STOP_STRINGS = 16


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(what)


def _int_list(v: Any, name: str, n: int | None = None, lo: int = 0, hi: int | None = None) -> list[int]:
    _need(isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v), f"{name}: ints")
    _need(n is None or len(v) == n, f"{name}: {n} entries expected")
    _need(all(i >= lo and (hi is None or i < hi) for i in v), f"{name}: out of range")
    return v


def _sampling(spec: Any) -> None:
    _need(isinstance(spec, dict) and isinstance(spec.get("step"), int) and spec["step"] >= 0, "sample spec")
    try:
        SamplingParams.from_dict(spec.get("params") or {})
    except (UserError, TypeError, ValueError) as e:
        raise ProtocolError(f"sampling params: {e}") from None


def _rows(v: Any, n_slots: int, max_len: int) -> list[list[int]]:
    """[slot, start, length] rows: at most one per KV slot and none past the cache."""
    _need(isinstance(v, list) and 1 <= len(v) <= n_slots, "rows")
    for row in v:
        slot, start, length = _int_list(row, "row", 3)
        _need(slot < n_slots and length >= 1 and start + length <= max_len, "row out of range")
    return v


def check_stage_message(msg: dict, sender: str, layout: SwarmLayout, replica: int, stage: int,
                        cfg: LlamaConfig, n_slots: int, max_len: int) -> None:
    """Raise ProtocolError unless `msg` is a well-formed message for this stage from the right peer."""
    stages = layout.replicas[replica]
    kind = msg.get("kind")
    if kind == "forward":
        _need(stage > 0 and sender == stages[stage - 1].peer, "activations from a peer that is not the previous stage")
        rows = _rows(msg.get("rows"), n_slots, max_len)
        n = len(rows)
        x = msg.get("x")
        _need(isinstance(x, torch.Tensor) and x.dtype in ACTIVATION_DTYPES and x.dim() == 2, "activations: [N,H] float")
        _need(tuple(x.shape) == (sum(r[2] for r in rows), cfg.hidden_size), f"activations of shape {list(x.shape)}")
        _need(isinstance(msg.get("rids"), list) and len(msg["rids"]) == n and all(isinstance(r, str) for r in msg["rids"]),
              "rids")
        _int_list(msg.get("steps"), "steps", None, 0)
        _need(isinstance(msg.get("samples"), list) and len(msg["samples"]) == n, "samples")
        for spec in msg["samples"]:
            if spec is not None:
                _sampling(spec)
        _need(isinstance(msg.get("t"), list) and all(isinstance(t, (int, float)) for t in msg["t"]), "stage times")
        # finiteness is checked by the stage engine on its device: on the node's event loop a scan of a
        # bf16 prefill chunk cost ~1 ms of CPU per MB (the busiest frame of a 2-stage profile on an H100)
    elif kind == "tokens":
        _need(stage == 0 and sender == stages[-1].peer, "tokens from a peer that is not the last stage")
        items = msg.get("items")
        _need(isinstance(items, list) and len(items) <= n_slots, "token items")
        _int_list(msg.get("steps"), "steps", None, 0)
        for it in items:
            _need(isinstance(it, dict) and isinstance(it.get("rid"), str), "token item")
            _int_list([it.get("token")], "token", 1, 0, cfg.vocab_size)
            _need(isinstance(it.get("step"), int), "token step")
        _need(isinstance(msg.get("t", []), list), "stage times")
    elif kind == "start":
        _need(stage == 0, "start for a stage other than 0")
        ids = _int_list(msg.get("prompt_ids"), "prompt_ids", None, 0, cfg.vocab_size)
        resume = _int_list(msg.get("resume_tokens") or [], "resume_tokens", None, 0, cfg.vocab_size)
        new = msg.get("max_new_tokens")
        _need(isinstance(new, int) and new >= 1 and 1 <= len(ids) and len(ids) + new <= max_len, "lengths")
        _need(len(resume) <= new, "resume tokens")
        _need(isinstance(msg.get("rid"), str) and len(msg["rid"]) <= 128 and isinstance(msg.get("entry"), str),
              "rid / entry")
        attempt = msg.get("attempt", 0)
        _need(attempt is None or (isinstance(attempt, int) and not isinstance(attempt, bool) and 0 <= attempt < 2**31),
              "attempt")
        stop = msg.get("stop") or []
        _need(isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) for s in stop), "stop")
        _sampling({"params": msg.get("params"), "step": 0})
    elif kind == "cancel":
        _need(isinstance(msg.get("rid"), str), "cancel rid")
    else:
        raise ProtocolError(f"unknown stage message {kind!r}")

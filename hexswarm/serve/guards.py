"""Checks on every message a serving node gets from peers, before other code sees it.

Pipeline messages to a stage (start, forward, tokens, cancel): every field a stage uses is checked
for type and range, activations for dtype and shape, and the sender against the peer the layout
says the message must come from.  A message that fails is dropped (and logged); the request it
belongs to is then resumed elsewhere by its entry node.  Messages to an entry (events, done) and the
control requests (dispatch, layout, trace) are decoded into checked values (`check_*`, `read_*`):
types, finiteness, integer ranges, lengths.  Anything that fails raises ProtocolError.
"""

from __future__ import annotations

from typing import Any

import torch

from hexswarm.errors import ProtocolError, UserError
from hexswarm.model.config import LlamaConfig
from hexswarm.runtime.sampling import SamplingParams
from hexswarm.runtime.stopping import MAX_STOP_STRINGS
from hexswarm.serve.layout import SwarmLayout

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_RID = 160  # a client's id (at most 128 characters) scoped by its entry (serve/submit.py: wire_id)
MAX_INT = 2**63 - 1  # epochs, attempts, indices: anything a peer may send that still fits an int64


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(what)


def _or_default(v: Any, default: Any) -> Any:
    """`v`, or `default` where the field is absent (None).  Not `v or default`: a truth test of a sender's value
    runs its __bool__ (a tensor of several values raises RuntimeError; found by the chaos run's hostile sender)."""
    return default if v is None else v


def _is_int(v: Any, lo: int = 0, hi: int = MAX_INT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _rid(v: Any) -> str:
    _need(isinstance(v, str) and 0 < len(v) <= MAX_RID, f"request id: a string of 1 to {MAX_RID} characters")
    return v


def check_address(v: Any, name: str = "to") -> list[int]:
    """[epoch, replica, stage] of a stage."""
    _need(isinstance(v, list) and len(v) == 3 and all(_is_int(i) for i in v), f"'{name}' must be [epoch, replica, stage]")
    return v


def _int_list(v: Any, name: str, n: int | None = None, lo: int = 0, hi: int | None = None) -> list[int]:
    # C-speed checks (set of types, min, max): a done message carries every token of its request
    _need(type(v) is list and (not v or set(map(type, v)) == {int}), f"{name}: ints")  # type(True) is bool
    _need(n is None or len(v) == n, f"{name}: {n} entries expected")
    _need(not v or (min(v) >= lo and (hi is None or max(v) < hi)), f"{name}: out of range")
    return v


def _sampling(spec: Any) -> None:
    _need(isinstance(spec, dict) and _is_int(spec.get("step")), "sample spec")
    sampling_params(_or_default(spec.get("params"), {}))


def sampling_params(params: Any) -> dict:
    """Sampling parameters as the engine reads them (finite, in range)."""
    _need(isinstance(params, dict), "sampling params: a map")
    try:
        return SamplingParams.from_dict(params).to_dict()
    except (UserError, TypeError, ValueError, OverflowError) as e:  # int(inf) overflows
        raise ProtocolError(f"sampling params: {e}") from None


def _rows(v: Any, max_batch: int, max_seq_len: int) -> list[list[int]]:
    """[slot, start, length] rows: at most one per KV slot and none past the cache."""
    _need(isinstance(v, list) and 1 <= len(v) <= max_batch, "rows")
    for row in v:
        slot, start, length = _int_list(row, "row", 3)
        _need(slot < max_batch and length >= 1 and start + length <= max_seq_len, "row out of range")
    return v


def check_stage_message(msg: dict, sender: str, layout: SwarmLayout, replica: int, stage: int,
                        cfg: LlamaConfig, max_batch: int, max_seq_len: int) -> None:
    """Raise ProtocolError unless `msg` is a well-formed message for this stage from the right peer."""
    stages = layout.replicas[replica]
    kind = msg.get("kind")
    if kind == "forward":
        _need(stage > 0 and sender == stages[stage - 1].peer, "activations from a peer that is not the previous stage")
        rows = _rows(msg.get("rows"), max_batch, max_seq_len)
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
        if msg.get("free") is not None:  # slots whose requests ended: their KV blocks go back to the pool
            _need(len(_int_list(msg["free"], "free", None, 0, max_batch)) <= max_batch, "free: too many slots")
        # finiteness is checked by the stage engine on its device: on the node's event loop a scan of a
        # bf16 prefill chunk cost ~1 ms of CPU per MB (the busiest frame of a 2-stage profile on an H100)
    elif kind == "tokens":
        _need(stage == 0 and sender == stages[-1].peer, "tokens from a peer that is not the last stage")
        items = msg.get("items")
        _need(isinstance(items, list) and len(items) <= max_batch, "token items")
        _int_list(msg.get("steps"), "steps", None, 0)
        for it in items:
            _need(isinstance(it, dict) and isinstance(it.get("rid"), str), "token item")
            _int_list([it.get("token")], "token", 1, 0, cfg.vocab_size)
            _need(isinstance(it.get("step"), int), "token step")
        _need(isinstance(msg.get("t", []), list), "stage times")
    elif kind == "start":
        _need(stage == 0, "start for a stage other than 0")
        ids = _int_list(msg.get("prompt_ids"), "prompt_ids", None, 0, cfg.vocab_size)
        resume = _int_list(_or_default(msg.get("resume_tokens"), []), "resume_tokens", None, 0, cfg.vocab_size)
        new = msg.get("max_new_tokens")
        _need(isinstance(new, int) and new >= 1 and 1 <= len(ids) and len(ids) + new <= max_seq_len, "lengths")
        _need(len(resume) <= new, "resume tokens")
        _need(isinstance(msg.get("rid"), str) and len(msg["rid"]) <= MAX_RID and isinstance(msg.get("entry"), str),
              "rid / entry")
        attempt = msg.get("attempt", 0)
        _need(attempt is None or (isinstance(attempt, int) and not isinstance(attempt, bool) and 0 <= attempt < 2**31),
              "attempt")
        stop = _or_default(msg.get("stop"), [])
        _need(isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) for s in stop), "stop")
        _need(isinstance(msg.get("ignore_eos", False), bool), "ignore_eos")
        _sampling({"params": msg.get("params"), "step": 0})
    elif kind == "cancel":
        _need(isinstance(msg.get("rid"), str), "cancel rid")
    elif kind == "link_broken":  # a later stage of this pipeline lost its link to a neighbour
        _need(stage == 0 and sender in {st.peer for st in stages[1:]}, "link_broken from a peer not in this pipeline")
        _need(isinstance(msg.get("peer"), str) and msg["peer"] in {st.peer for st in stages}, "link_broken peer")
    else:
        raise ProtocolError(f"unknown stage message {kind!r}")


# ---- messages to an entry node (from a request's stage 0) -----------------------------------
def check_events(msg: dict) -> list[dict]:
    """The token items of an `events` message: {rid, attempt, index, token} each."""
    items = msg.get("items")
    _need(isinstance(items, list), "events: items is not a list")
    if "to_stage0" in msg:
        check_address(msg["to_stage0"], "to_stage0")
    for it in items:
        _need(isinstance(it, dict), "events: an item is not a map")
        _rid(it.get("rid"))
        _need(_is_int(it.get("attempt")) and _is_int(it.get("index")) and _is_int(it.get("token")),
              "events: attempt, index and token are non-negative integers")
    return items


def check_done(msg: dict) -> dict:
    """A `done` message: the finished request's tokens and timings, or an error."""
    _rid(msg.get("rid"))
    _need(_is_int(msg.get("attempt")), "done: attempt")
    if "to_stage0" in msg:
        check_address(msg["to_stage0"], "to_stage0")
    if "error" in msg:
        _need(isinstance(msg["error"], str), "done: error is not a string")
        return msg
    _int_list(msg.get("tokens"), "done: tokens")
    _int_list(msg.get("prompt_tokens"), "done: prompt_tokens")
    _need(isinstance(msg.get("text"), str) and isinstance(msg.get("finish_reason"), str), "done: text, finish_reason")
    _need(isinstance(msg.get("timings"), dict), "done: timings")
    return msg


# ---- control requests ------------------------------------------------------------------------
def read_dispatch(msg: Any, entry: str, cfg: LlamaConfig, max_seq_len: int) -> dict:
    """A request to place, from its entry node (the sender: a peer places only its own requests)."""
    _need(isinstance(msg, dict), "dispatch: a map")
    _need(msg.get("entry") == entry, "dispatch: the entry must be the sender")
    ids = _int_list(msg.get("prompt_ids"), "prompt_ids", None, 0, cfg.vocab_size)
    new = msg.get("max_new_tokens")
    _need(_is_int(new, 1) and 1 <= len(ids) and len(ids) + new <= max_seq_len, "dispatch: lengths")
    resume = _int_list(_or_default(msg.get("resume_tokens"), []), "resume_tokens", None, 0, cfg.vocab_size)
    _need(len(resume) <= new, "dispatch: more resume tokens than new tokens")
    stop = _or_default(msg.get("stop"), [])
    _need(isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) for s in stop), "stop")
    _need(_is_int(msg.get("attempt"), 1, 2**31), "dispatch: attempt")
    ignore_eos = msg.get("ignore_eos", False)
    _need(isinstance(ignore_eos, bool), "dispatch: ignore_eos")
    return {"rid": _rid(msg.get("rid")), "prompt_ids": ids, "params": sampling_params(msg.get("params")),
            "max_new_tokens": new, "stop": stop, "ignore_eos": ignore_eos, "entry": entry, "attempt": msg["attempt"],
            "resume_tokens": resume, "resumed": msg.get("resumed") is True}


def read_placed(msg: Any) -> tuple[str, int, dict | None, tuple[str, str] | None]:
    """A head's answer to a `dispatch` frame (serve/placement.py): (rid, attempt, placement or None,
    (code, message) or None)."""
    _need(isinstance(msg, dict), "placed: a map")
    rid, attempt = _rid(msg.get("rid")), msg.get("attempt")
    _need(_is_int(attempt, 1, 2**31), "placed: attempt")
    err = msg.get("error")
    if err is not None:
        _need(isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(err.get("message"), str),
              "placed: error")
        return rid, attempt, None, (err["code"][:64], err["message"][:500])
    p = msg.get("placement")
    _need(isinstance(p, dict) and _is_int(p.get("epoch")) and _is_int(p.get("replica")) and p.get("attempt") == attempt
          and isinstance(p.get("head"), str) and isinstance(p.get("stages"), list) and 0 < len(p["stages"]) <= 1024
          and all(isinstance(st, dict) and isinstance(st.get("peer"), str) and _is_int(st.get("tp"), 1)
                  and isinstance(st.get("layers"), list) and len(st["layers"]) == 2 and all(_is_int(x) for x in st["layers"])
                  for st in p["stages"]), "placed: placement")
    return rid, attempt, p, None


def read_layout_request(msg: Any) -> int | None:
    """The epoch of a `ready` report, or None for a query of the committed layout."""
    _need(isinstance(msg, dict), "layout: a map")
    if "ready" not in msg:
        return None
    _need(_is_int(msg["ready"], 1), "layout: ready names an epoch")
    return msg["ready"]


def read_trace_request(msg: Any) -> tuple[str, bool]:
    """(request id, only this node's spans?)"""
    _need(isinstance(msg, dict), "trace: a map")
    return _rid(msg.get("rid")), msg.get("local") is True

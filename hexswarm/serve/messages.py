"""What peers send this node's serving layer, decoded and checked in one place: the pipe's message kinds where the
pipe hands a received message on, and the control requests (layout, trace).

Every check raises ProtocolError naming the field: types, finiteness, integer ranges, lengths.

`/hexswarm/pipe/2`, the direct path and the messages a node sends itself carry codec maps with a `kind`.
`PipelineDecoder.decode` turns each into a typed value whose fields say what they are, or raises ProtocolError
naming what was wrong (the pipe drops the message with one log line; `UnknownKind`, a kind only a newer peer
knows, is dropped quietly).  The pipe then hands the value to the consumer registered for its class:

| wire kind | typed value | from -> to | consumer |
|---|---|---|---|
| `start` | `StartRequest` | head -> stage 0 | `Server._start_here` (a head candidate, a newer attempt), then `route` |
| `forward` | `ForwardStep` | stage i -> stage i+1 | `StageSet.route` -> the stage engine |
| `tokens` | `SampledTokens` | last stage -> stage 0 | `StageSet.route` -> the stage engine |
| `cancel` | `CancelRequest` | entry (or stage 0's own node) -> stage 0 | `StageSet.route` -> the stage engine |
| `link_broken` | `LinkBrokenNotice` | a later stage -> stage 0 | `StageSet.route` -> the stage engine |
| `events` | `TokenEvents` | stage 0 -> entry | `Server._events_to_entry` -> each request's relay |
| `done` | `RequestDone` | stage 0 (or a node that could not start it) -> entry | `Server._done_to_entry` |
| `dispatch` | `DispatchRequest` | entry -> head | `PipeDispatch._on_dispatch` (serve/placement.py) |
| `placed` | `PlacementAnswer` | head -> entry | `PipeDispatch._on_placed` |

A message to a stage is checked against that stage (`StageFacts`: who may send it what, its KV slots), which the
decoder gets from a lookup (`StageSet.stage_facts`).  A step or notice for a stage that no worker here takes under
that address (none loaded, or a step to an alias: serve/stages.py) cannot be checked; it decodes to `NoStageHere`,
which `StageSet.route` drops.  A `start` or `cancel` needs nothing of the stage and is always checked in full.

The wire keys stay as they are (nodes of older installs interoperate).  The stage engine (runtime/) still takes
dicts with the wire keys (`engine_message`) and the entry's relay dicts of its own (`relay_message(s)`), both
built from the checked fields only; tensors are never copied.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Union

import torch

from hexswarm.errors import ProtocolError, UserError
from hexswarm.model.config import LlamaConfig
from hexswarm.net.submit_request import MAX_STOP_STRINGS
from hexswarm.runtime.sampling import SamplingParams
from hexswarm.serve.layout import StageAssignment

MAX_RID = 160  # a client's id (at most 128 characters) scoped by its entry (serve/submit.py: wire_id)
MAX_INT = 2**63 - 1  # epochs, attempts, indices: anything a peer may send that still fits an int64
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ATTEMPT = 2**31  # an entry numbers the attempts of a request from 1


# ---- field checks ------------------------------------------------------------------------------------
def need(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(what)


def or_default(v: Any, default: Any) -> Any:
    """`v`, or `default` where the field is absent (None).  Not `v or default`: a truth test of a sender's value
    runs its __bool__ (a tensor of several values raises RuntimeError; found by the chaos run's hostile sender)."""
    return default if v is None else v


def is_int(v: Any, lo: int = 0, hi: int = MAX_INT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def request_id(v: Any) -> str:
    need(isinstance(v, str) and 0 < len(v) <= MAX_RID, f"request id: a string of 1 to {MAX_RID} characters")
    return v


def int_list(v: Any, name: str, n: int | None = None, lo: int = 0, hi: int | None = None) -> list[int]:
    # C-speed checks (set of types, min, max): a done message carries every token of its request
    need(type(v) is list and (not v or set(map(type, v)) == {int}), f"{name}: ints")  # type(True) is bool
    need(n is None or len(v) == n, f"{name}: {n} entries expected")
    need(not v or (min(v) >= lo and (hi is None or max(v) < hi)), f"{name}: out of range")
    return v


def stop_strings(v: Any) -> list[str]:
    """A request's stop strings (absent: none)."""
    stop = or_default(v, [])
    need(isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) for s in stop), "stop")
    return stop


def sampling_params(params: Any) -> dict:
    """Sampling parameters as the engine reads them (finite, in range)."""
    need(isinstance(params, dict), "sampling params: a map")
    try:
        return SamplingParams.from_dict(params).to_dict()
    except (UserError, TypeError, ValueError, OverflowError) as e:  # int(inf) overflows
        raise ProtocolError(f"sampling params: {e}") from None


class UnknownKind(ProtocolError):
    """A kind this install does not know (a newer peer may send one): dropped without a warning."""


class StageAddress(NamedTuple):
    """The stage a message goes to (`to`: [epoch, replica, stage] on the wire); usable as a StageSet key."""
    epoch: int
    replica: int
    stage: int


class StageFacts(NamedTuple):
    """What a message to one stage here is checked against: its pipeline's stages in order (who may send it
    what) and the stage's KV slots (rows per step)."""
    pipeline: tuple[StageAssignment, ...]
    max_batch: int


# (address, kind) -> that stage's facts; None where no worker here takes a message of that kind at that address
StageFactsLookup = Callable[[StageAddress, str], "StageFacts | None"]


def stage_address(v: Any, name: str = "to") -> StageAddress:
    if isinstance(v, list) and len(v) == 3:  # every forward and tokens message: no generator, no message built
        epoch, replica, stage = v
        if is_int(epoch) and is_int(replica) and is_int(stage):
            return StageAddress(epoch, replica, stage)
    raise ProtocolError(f"'{name}' must be [epoch, replica, stage]")


def _stage0(msg: dict) -> StageAddress | None:
    """The stage 0 that sent an entry its message (`to_stage0`: the entry cancels that attempt there)."""
    return stage_address(msg["to_stage0"], "to_stage0") if "to_stage0" in msg else None


def _sent_at(v: Any) -> float | None:
    """The sender's wall-clock send time (traces' network time per hop); anything else is no time, never a
    reason to drop the message."""
    if type(v) is float and math.isfinite(v):
        return v
    return float(v) if type(v) is int and abs(v) <= MAX_INT else None


def _stage_times(v: Any) -> list[float]:
    """Seconds each earlier stage spent on a step (`t` on the wire), for the request's timings."""
    need(isinstance(v, list) and all(isinstance(t, (int, float)) for t in v), "stage times")
    return v


def _sample_spec(spec: Any) -> None:
    need(isinstance(spec, dict) and is_int(spec.get("step")), "sample spec")
    sampling_params(or_default(spec.get("params"), {}))


def _rows(v: Any, max_batch: int, max_seq_len: int) -> list[list[int]]:
    """[slot, start, length] rows: at most one per KV slot and none past the cache."""
    need(isinstance(v, list) and 1 <= len(v) <= max_batch, "rows")
    for row in v:
        slot, start, length = int_list(row, "row", 3)
        need(slot < max_batch and length >= 1 and start + length <= max_seq_len, "row out of range")
    return v


# ---- messages to a stage ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RequestToRun:
    """What a pipeline needs of a request, as the entry asks the head to place it and the head starts it."""
    rid: str  # the id scoped by its entry (serve/submit.py wire_id)
    entry: str  # the node that relays its tokens to the client
    attempt: int
    prompt_ids: list[int]
    max_new_tokens: int
    params: dict  # sampling parameters, checked and as SamplingParams.to_dict writes them
    stop: list[str]
    ignore_eos: bool
    resume_tokens: list[int]  # tokens a resumed request already has: prefilled after the prompt


@dataclass(frozen=True, slots=True)
class StartRequest(RequestToRun):
    """A request placed on this pipeline by the head: stage 0 prefills the prompt (and any tokens a resumed
    request already has) and generates up to `max_new_tokens`."""
    kind: ClassVar[str] = "start"
    to: StageAddress
    sent_at: float | None

    def engine_message(self, sender: str, received_at: float) -> dict:
        return {"kind": "start", "rid": self.rid, "entry": self.entry, "attempt": self.attempt,
                "prompt_ids": self.prompt_ids, "max_new_tokens": self.max_new_tokens, "params": self.params,
                "stop": self.stop, "ignore_eos": self.ignore_eos, "resume_tokens": self.resume_tokens,
                "sent_at": self.sent_at, "_sender": sender, "_recv_at": received_at}


@dataclass(frozen=True, slots=True)
class ForwardStep:
    """One engine step's activations, from the previous stage: the rows' new tokens through its layers."""
    kind: ClassVar[str] = "forward"
    to: StageAddress
    step_ids: list[int]  # `steps`: the ids stage 0 gave the step(s) these rows belong to
    rows: list[list[int]]  # [slot, start, length] per row
    rids: list[str]  # per row
    samples: list[dict | None]  # per row: {step, params, attempt} where the last stage samples it, else None
    activations: torch.Tensor  # `x`: [N, H] for the rows' N new tokens
    stage_times: list[float]  # `t`
    free_slots: list[int] | None  # `free`: slots whose requests ended; their KV blocks go back before the step
    sent_at: float | None

    def engine_message(self, sender: str, received_at: float) -> dict:
        msg = {"kind": "forward", "steps": self.step_ids, "rows": self.rows, "rids": self.rids,
               "samples": self.samples, "x": self.activations, "t": self.stage_times, "sent_at": self.sent_at,
               "_sender": sender, "_recv_at": received_at}
        if self.free_slots is not None:
            msg["free"] = self.free_slots
        return msg


@dataclass(frozen=True, slots=True)
class SampledTokens:
    """The tokens the last stage drew for one step, back to stage 0."""
    kind: ClassVar[str] = "tokens"
    to: StageAddress
    step_ids: list[int]  # `steps`
    items: list[dict]  # {rid, token, step, attempt} per sampled row, as sent
    stage_times: list[float]  # `t`
    sent_at: float | None

    def engine_message(self, sender: str, received_at: float) -> dict:
        return {"kind": "tokens", "steps": self.step_ids, "items": self.items, "t": self.stage_times,
                "sent_at": self.sent_at, "_sender": sender, "_recv_at": received_at}


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Stop a request at stage 0 (only `attempt` of it, when named); the engine takes it only from the
    request's entry or its own node."""
    kind: ClassVar[str] = "cancel"
    to: StageAddress
    rid: str
    attempt: int | None

    def engine_message(self, sender: str, received_at: float) -> dict:
        return {"kind": "cancel", "rid": self.rid, "attempt": self.attempt, "_sender": sender,
                "_recv_at": received_at}


@dataclass(frozen=True, slots=True)
class LinkBrokenNotice:
    """A later stage of this pipeline lost its link to `peer`: stage 0 hands back the steps it has in flight."""
    kind: ClassVar[str] = "link_broken"
    to: StageAddress
    peer: str

    def engine_message(self, sender: str, received_at: float) -> dict:
        return {"kind": "link_broken", "peer": self.peer, "_sender": sender, "_recv_at": received_at}


@dataclass(frozen=True, slots=True)
class NoStageHere:
    """A step or notice for a stage that no worker here takes under that address: not checked, dropped."""
    kind: str
    to: StageAddress


def _generation_fields(msg: dict, cfg: LlamaConfig, max_seq_len: int,
                       prefix: str = "") -> tuple[list[int], int, list[int], list[str], bool]:
    """(prompt ids, max new tokens, resume tokens, stop strings, ignore_eos): the fields a `start` and a `dispatch`
    share, checked alike (`prefix` opens each error's text)."""
    ids = int_list(msg.get("prompt_ids"), "prompt_ids", None, 0, cfg.vocab_size)
    new = msg.get("max_new_tokens")
    need(is_int(new, 1) and 1 <= len(ids) and len(ids) + new <= max_seq_len, f"{prefix}lengths")
    resume = int_list(or_default(msg.get("resume_tokens"), []), "resume_tokens", None, 0, cfg.vocab_size)
    need(len(resume) <= new, f"{prefix}more resume tokens than new tokens")
    stop = stop_strings(msg.get("stop"))
    ignore_eos = msg.get("ignore_eos", False)
    need(isinstance(ignore_eos, bool), f"{prefix}ignore_eos")
    return ids, new, resume, stop, ignore_eos


def _decode_start(msg: dict, sender: str, to: StageAddress, facts: StageFacts | None, cfg: LlamaConfig,
                  max_seq_len: int) -> StartRequest:
    need(to.stage == 0, "start for a stage other than 0")
    ids, new, resume, stop, ignore_eos = _generation_fields(msg, cfg, max_seq_len)
    rid, entry = msg.get("rid"), msg.get("entry")
    need(isinstance(rid, str) and len(rid) <= MAX_RID and isinstance(entry, str), "rid / entry")
    attempt = msg.get("attempt")
    need(is_int(attempt, 0, MAX_ATTEMPT - 1), "attempt")
    params = sampling_params(or_default(msg.get("params"), {}))
    return StartRequest(rid, entry, attempt, ids, new, params, stop, ignore_eos, resume, to=to,
                        sent_at=_sent_at(msg.get("sent_at")))


def _decode_forward(msg: dict, sender: str, to: StageAddress, facts: StageFacts, cfg: LlamaConfig,
                    max_seq_len: int) -> ForwardStep:
    need(to.stage > 0 and sender == facts.pipeline[to.stage - 1].peer,
         "activations from a peer that is not the previous stage")
    rows = _rows(msg.get("rows"), facts.max_batch, max_seq_len)
    n = len(rows)
    x = msg.get("x")
    need(isinstance(x, torch.Tensor) and x.dtype in ACTIVATION_DTYPES and x.dim() == 2, "activations: [N,H] float")
    if tuple(x.shape) != (sum(r[2] for r in rows), cfg.hidden_size):  # the message only when it is wrong
        raise ProtocolError(f"activations of shape {list(x.shape)}")
    rids = msg.get("rids")
    need(isinstance(rids, list) and len(rids) == n and all(isinstance(r, str) for r in rids), "rids")
    steps = int_list(msg.get("steps"), "steps", None, 0)
    samples = msg.get("samples")
    need(isinstance(samples, list) and len(samples) == n, "samples")
    for spec in samples:
        if spec is not None:
            _sample_spec(spec)
    stage_times = _stage_times(msg.get("t"))
    free = msg.get("free")
    if free is not None:
        need(len(int_list(free, "free", None, 0, facts.max_batch)) <= facts.max_batch, "free: too many slots")
    # finiteness is checked by the stage engine on its device: on the node's event loop a scan of a
    # bf16 prefill chunk cost ~1 ms of CPU per MB (the busiest frame of a 2-stage profile on an H100)
    return ForwardStep(to, steps, rows, rids, samples, x, stage_times, free, _sent_at(msg.get("sent_at")))


def _decode_tokens(msg: dict, sender: str, to: StageAddress, facts: StageFacts, cfg: LlamaConfig,
                   max_seq_len: int) -> SampledTokens:
    need(to.stage == 0 and sender == facts.pipeline[-1].peer, "tokens from a peer that is not the last stage")
    items = msg.get("items")
    need(isinstance(items, list) and len(items) <= facts.max_batch, "token items")
    steps = int_list(msg.get("steps"), "steps", None, 0)
    for it in items:
        need(isinstance(it, dict) and isinstance(it.get("rid"), str), "token item")
        int_list([it.get("token")], "token", 1, 0, cfg.vocab_size)
        need(isinstance(it.get("step"), int), "token step")
    return SampledTokens(to, steps, items, _stage_times(msg.get("t", [])), _sent_at(msg.get("sent_at")))


def _decode_cancel(msg: dict, sender: str, to: StageAddress, facts: StageFacts | None, cfg: LlamaConfig,
                   max_seq_len: int) -> CancelRequest:
    rid, attempt = msg.get("rid"), msg.get("attempt")
    need(isinstance(rid, str), "cancel rid")
    need(attempt is None or is_int(attempt), "cancel attempt")
    return CancelRequest(to, rid, attempt)


def _decode_link_broken(msg: dict, sender: str, to: StageAddress, facts: StageFacts, cfg: LlamaConfig,
                        max_seq_len: int) -> LinkBrokenNotice:
    need(to.stage == 0 and sender in {st.peer for st in facts.pipeline[1:]},
         "link_broken from a peer not in this pipeline")
    peer = msg.get("peer")
    need(isinstance(peer, str) and peer in {st.peer for st in facts.pipeline}, "link_broken peer")
    return LinkBrokenNotice(to, peer)


_STAGE_KINDS = {"start": _decode_start, "forward": _decode_forward, "tokens": _decode_tokens,
                "cancel": _decode_cancel, "link_broken": _decode_link_broken}
CHECKED_AGAINST_STAGE = frozenset({"forward", "tokens", "link_broken"})  # the kinds whose checks need StageFacts


def decode_stage_message(msg: dict, sender: str, to: StageAddress, facts: StageFacts | None, cfg: LlamaConfig,
                         max_seq_len: int) -> StageMessage:
    """A message to stage `to` from `sender`, checked against that stage (`facts`, needed by the kinds in
    CHECKED_AGAINST_STAGE); ProtocolError when it is malformed or from the wrong peer."""
    kind = msg.get("kind")
    decode_kind = _STAGE_KINDS.get(kind) if isinstance(kind, str) else None
    if decode_kind is None:
        raise ProtocolError(f"unknown stage message {kind!r}")
    return decode_kind(msg, sender, to, facts, cfg, max_seq_len)


# ---- messages to an entry node (from a request's stage 0) -------------------------------------
@dataclass(frozen=True, slots=True)
class TokenEvents:
    """One stage-0 step's new tokens for the requests that entered at this node."""
    kind: ClassVar[str] = "events"
    items: list[dict]  # {rid, attempt, index, token} each, as sent
    stage0: StageAddress | None  # `to_stage0`

    def relay_messages(self, sender: str) -> list[dict]:
        """One message per token for its request's relay (serve/submit.py), from the checked fields only."""
        stage0 = None if self.stage0 is None else list(self.stage0)
        return [{"kind": "event", "to_stage0": stage0, "rid": it["rid"], "attempt": it["attempt"],
                 "index": it["index"], "token": it["token"], "_sender": sender} for it in self.items]


@dataclass(frozen=True, slots=True)
class RequestDone:
    """A request's end at stage 0: all its tokens and timings, or an error (its entry then resumes it)."""
    kind: ClassVar[str] = "done"
    rid: str
    attempt: int
    stage0: StageAddress | None  # `to_stage0`; None from a node that could not start the request
    error: str | None = None
    tokens: list[int] | None = None
    prompt_tokens: list[int] | None = None
    text: str | None = None
    finish_reason: str | None = None
    timings: dict | None = None

    def relay_message(self, sender: str) -> dict:
        """The message for the request's relay (serve/submit.py): `error`, or the result, never both."""
        msg = {"kind": "done", "rid": self.rid, "attempt": self.attempt, "_sender": sender}
        if self.stage0 is not None:
            msg["to_stage0"] = list(self.stage0)
        if self.error is not None:
            msg["error"] = self.error
        else:
            msg.update(tokens=self.tokens, prompt_tokens=self.prompt_tokens, text=self.text,
                       finish_reason=self.finish_reason, timings=self.timings)
        return msg


def decode_events(msg: dict) -> TokenEvents:
    items = msg.get("items")
    need(isinstance(items, list), "events: items is not a list")
    stage0 = _stage0(msg)
    for it in items:
        need(isinstance(it, dict), "events: an item is not a map")
        request_id(it.get("rid"))
        need(is_int(it.get("attempt")) and is_int(it.get("index")) and is_int(it.get("token")),
             "events: attempt, index and token are non-negative integers")
    return TokenEvents(items, stage0)


def decode_done(msg: dict) -> RequestDone:
    rid, attempt = request_id(msg.get("rid")), msg.get("attempt")
    need(is_int(attempt), "done: attempt")
    stage0 = _stage0(msg)
    if "error" in msg:
        need(isinstance(msg["error"], str), "done: error is not a string")
        return RequestDone(rid, attempt, stage0, error=msg["error"])
    tokens = int_list(msg.get("tokens"), "done: tokens")
    prompt_tokens = int_list(msg.get("prompt_tokens"), "done: prompt_tokens")
    text, finish_reason = msg.get("text"), msg.get("finish_reason")
    need(isinstance(text, str) and isinstance(finish_reason, str), "done: text, finish_reason")
    timings = msg.get("timings")
    need(isinstance(timings, dict), "done: timings")
    return RequestDone(rid, attempt, stage0, None, tokens, prompt_tokens, text, finish_reason, timings)


# ---- placing a request (serve/placement.py) ----------------------------------------------------
@dataclass(frozen=True, slots=True)
class DispatchRequest(RequestToRun):
    """A request its entry (the sender: a peer places only its own requests) asks the head to place (the pipe's
    `dispatch` frame, or `/hexswarm/dispatch/1`)."""
    kind: ClassVar[str] = "dispatch"
    resumed: bool  # a client's resubmission: already accepted, never refused as busy

    def to_dict(self) -> dict:
        """The fields as `Server.dispatch` takes them (the entry's own requests come to it as such dicts)."""
        return {"rid": self.rid, "prompt_ids": self.prompt_ids, "params": self.params,
                "max_new_tokens": self.max_new_tokens, "stop": self.stop, "ignore_eos": self.ignore_eos,
                "entry": self.entry, "attempt": self.attempt, "resume_tokens": self.resume_tokens,
                "resumed": self.resumed}


@dataclass(frozen=True, slots=True)
class PlacementAnswer:
    """The head's answer to a `dispatch`: where the request runs, or why it was not placed."""
    kind: ClassVar[str] = "placed"
    rid: str
    attempt: int
    placement: dict | None  # {epoch, replica, head, attempt, stages}
    error: tuple[str, str] | None  # (code, message)


def decode_dispatch(msg: Any, entry: str, cfg: LlamaConfig, max_seq_len: int) -> DispatchRequest:
    """A request to place, from its entry node (the sender: a peer places only its own requests)."""
    need(isinstance(msg, dict), "dispatch: a map")
    need(msg.get("entry") == entry, "dispatch: the entry must be the sender")
    ids, new, resume, stop, ignore_eos = _generation_fields(msg, cfg, max_seq_len, "dispatch: ")
    attempt = msg.get("attempt")
    need(is_int(attempt, 1, MAX_ATTEMPT), "dispatch: attempt")
    rid = request_id(msg.get("rid"))
    return DispatchRequest(rid, entry, attempt, ids, new, sampling_params(msg.get("params")), stop, ignore_eos,
                           resume, msg.get("resumed") is True)


def decode_placed(msg: Any) -> PlacementAnswer:
    need(isinstance(msg, dict), "placed: a map")
    rid, attempt = request_id(msg.get("rid")), msg.get("attempt")
    need(is_int(attempt, 1, MAX_ATTEMPT), "placed: attempt")
    err = msg.get("error")
    if err is not None:
        need(isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(err.get("message"), str),
             "placed: error")
        return PlacementAnswer(rid, attempt, None, (err["code"][:64], err["message"][:500]))
    p = msg.get("placement")
    need(isinstance(p, dict) and is_int(p.get("epoch")) and is_int(p.get("replica")) and p.get("attempt") == attempt
         and isinstance(p.get("head"), str) and isinstance(p.get("stages"), list) and 0 < len(p["stages"]) <= 1024
         and all(isinstance(st, dict) and isinstance(st.get("peer"), str) and is_int(st.get("tp"), 1)
                 and isinstance(st.get("layers"), list) and len(st["layers"]) == 2
                 and all(is_int(x) for x in st["layers"]) for st in p["stages"]), "placed: placement")
    return PlacementAnswer(rid, attempt, p, None)


StageMessage = Union[StartRequest, ForwardStep, SampledTokens, CancelRequest, LinkBrokenNotice, NoStageHere]
PipelineMessage = Union[StageMessage, TokenEvents, RequestDone, DispatchRequest, PlacementAnswer]


class PipelineDecoder:
    """Every received pipe message, by kind, into its typed value (or ProtocolError): the model's sizes and the
    longest sequence bound what a message may hold, `stage_facts` says what a message to a stage here is checked
    against."""

    def __init__(self, cfg: LlamaConfig, max_seq_len: int, stage_facts: StageFactsLookup):
        self.cfg = cfg
        self.max_seq_len = max_seq_len
        self.stage_facts = stage_facts
        self._by_kind: dict[str, Callable[[dict, str], PipelineMessage]] = {
            **{kind: self._to_stage for kind in _STAGE_KINDS},
            "events": lambda msg, sender: decode_events(msg),
            "done": lambda msg, sender: decode_done(msg),
            "dispatch": lambda msg, sender: decode_dispatch(msg, sender, self.cfg, self.max_seq_len),
            "placed": lambda msg, sender: decode_placed(msg),
        }

    def decode(self, msg: Any, sender: str) -> PipelineMessage:
        kind = msg.get("kind") if isinstance(msg, dict) else None
        need(isinstance(kind, str), "a pipe message is a map with a kind")
        decode_kind = self._by_kind.get(kind)
        if decode_kind is None:
            raise UnknownKind(f"unknown pipe message kind {kind!r}")
        return decode_kind(msg, sender)

    def _to_stage(self, msg: dict, sender: str) -> StageMessage:
        kind = msg["kind"]
        to = stage_address(msg.get("to"))
        facts = None
        if kind in CHECKED_AGAINST_STAGE:
            facts = self.stage_facts(to, kind)
            if facts is None:
                return NoStageHere(kind, to)
        return decode_stage_message(msg, sender, to, facts, self.cfg, self.max_seq_len)


# ---- control requests ------------------------------------------------------------------------
def read_layout_request(msg: Any) -> int | None:
    """The epoch of a `ready` report, or None for a query of the committed layout."""
    need(isinstance(msg, dict), "layout: a map")
    if "ready" not in msg:
        return None
    need(is_int(msg["ready"], 1), "layout: ready names an epoch")
    return msg["ready"]


def read_trace_request(msg: Any) -> tuple[str, bool]:
    """(request id, only this node's spans?)"""
    need(isinstance(msg, dict), "trace: a map")
    return request_id(msg.get("rid")), msg.get("local") is True

"""The pipe's message kinds decoded in one place (serve/messages.py): each kind into its typed value,
each bad field refused with a ProtocolError that names it, and nothing but ProtocolError out of any map."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hexswarm.errors import ProtocolError
from hexswarm.serve.layout import StageAssignment
from hexswarm.serve.messages import (CancelRequest, DispatchRequest, ForwardStep, LinkBrokenNotice, NoStageHere,
                                     PipelineDecoder, PlacementAnswer, RequestDone, SampledTokens, StageAddress,
                                     StageFacts, StartRequest, TokenEvents, UnknownKind)

CFG = SimpleNamespace(vocab_size=100, hidden_size=8)
MAX_SEQ_LEN = 64
PIPELINE = (StageAssignment("A", 1, 0, 1), StageAssignment("B", 1, 1, 2), StageAssignment("C", 1, 2, 4))
MAX_BATCH = 4
PARAMS = {"temperature": 0.5, "top_k": 0, "top_p": 1.0, "seed": 3}


def facts(to: StageAddress, kind: str) -> StageFacts | None:
    """Stages of epoch 1 replica 0 are served here; nothing else."""
    return StageFacts(PIPELINE, MAX_BATCH) if (to.epoch, to.replica) == (1, 0) and to.stage < 3 else None


DECODER = PipelineDecoder(CFG, MAX_SEQ_LEN, facts)


def templates() -> dict[str, tuple[dict, str]]:
    """kind -> (a well-formed message, the peer that may send it)."""
    return {
        "start": ({"kind": "start", "to": [1, 0, 0], "rid": "r@E", "entry": "E", "attempt": 2, "prompt_ids": [1, 2],
                   "max_new_tokens": 4, "params": PARAMS, "stop": ["x"], "resume_tokens": [5], "ignore_eos": True},
                  "H"),
        "forward": ({"kind": "forward", "to": [1, 0, 1], "steps": [7], "rows": [[0, 3, 2], [1, 9, 1]],
                     "rids": ["a", "b"], "samples": [None, {"step": 1, "params": PARAMS, "attempt": 1}],
                     "x": torch.zeros(3, 8), "t": [0.25], "free": [2], "sent_at": 12.5}, "A"),
        "tokens": ({"kind": "tokens", "to": [1, 0, 0], "steps": [7],
                    "items": [{"rid": "b", "token": 42, "step": 1, "attempt": 1}], "t": [0.25, 0.5]}, "C"),
        "cancel": ({"kind": "cancel", "to": [1, 0, 0], "rid": "r@E", "attempt": 2}, "E"),
        "link_broken": ({"kind": "link_broken", "to": [1, 0, 0], "peer": "C"}, "B"),
        "events": ({"kind": "events", "to_stage0": [1, 0, 0],
                    "items": [{"rid": "r@E", "attempt": 2, "index": 0, "token": 42}]}, "A"),
        "done": ({"kind": "done", "rid": "r@E", "attempt": 2, "to_stage0": [1, 0, 0], "tokens": [42],
                  "prompt_tokens": [1, 2], "text": "x", "finish_reason": "length", "timings": {"total_s": 0.1}}, "A"),
        "dispatch": ({"kind": "dispatch", "rid": "r@E", "entry": "E", "attempt": 2, "prompt_ids": [1, 2],
                      "max_new_tokens": 4, "params": PARAMS, "stop": [], "resume_tokens": [], "resumed": True}, "E"),
        "placed": ({"kind": "placed", "rid": "r@E", "attempt": 2,
                    "placement": {"epoch": 1, "replica": 0, "head": "H", "attempt": 2,
                                  "stages": [{"peer": "A", "tp": 1, "layers": [0, 4]}]}}, "H"),
    }


TYPES = {"start": StartRequest, "forward": ForwardStep, "tokens": SampledTokens, "cancel": CancelRequest,
         "link_broken": LinkBrokenNotice, "events": TokenEvents, "done": RequestDone, "dispatch": DispatchRequest,
         "placed": PlacementAnswer}


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_each_kind_decodes_to_its_typed_value(kind):
    msg, sender = templates()[kind]
    value = DECODER.decode(msg, sender)
    assert type(value) is TYPES[kind] and value.kind == kind


def test_the_typed_fields_say_what_they_are_and_hold_the_senders_values_uncopied():
    msg, sender = templates()["forward"]
    step = DECODER.decode(msg, sender)
    assert step.to == StageAddress(1, 0, 1) and step.step_ids == [7] and step.rows is msg["rows"]
    assert step.activations is msg["x"] and step.stage_times == [0.25] and step.free_slots == [2]
    assert step.sent_at == 12.5
    msg, sender = templates()["tokens"]
    tokens = DECODER.decode(msg, sender)
    assert tokens.items is msg["items"] and tokens.step_ids == [7] and tokens.stage_times == [0.25, 0.5]
    start = DECODER.decode(*templates()["start"])
    assert (start.rid, start.entry, start.attempt, start.ignore_eos, start.resume_tokens) == ("r@E", "E", 2, True, [5])
    assert start.params == PARAMS and start.sent_at is None
    done = DECODER.decode(*templates()["done"])
    assert done.stage0 == (1, 0, 0) and done.error is None and done.tokens == [42]
    placed = DECODER.decode(*templates()["placed"])
    assert placed.placement["epoch"] == 1 and placed.error is None
    refused = DECODER.decode({"kind": "placed", "rid": "r@E", "attempt": 2,
                              "error": {"code": "busy", "message": "m" * 900}}, "H")
    assert refused.placement is None and refused.error == ("busy", "m" * 500)


@pytest.mark.parametrize("kind", ["start", "forward", "tokens", "cancel", "link_broken"])
def test_the_engine_gets_the_wire_keys_from_the_checked_fields(kind):
    msg, sender = templates()[kind]
    got = DECODER.decode(msg, sender).engine_message(sender, 99.0)
    assert got["_sender"] == sender and got["_recv_at"] == 99.0
    for key, value in msg.items():
        if key != "to":  # the address picked the worker; the engine never reads it
            assert got[key] is value or got[key] == value, key
    if kind == "forward":
        assert got["x"] is msg["x"]  # never a copy of the activations


def test_the_entry_relay_gets_one_message_per_token_and_the_done_as_it_was():
    msg, sender = templates()["events"]
    (event,) = DECODER.decode({**msg, "items": [{**msg["items"][0], "kind": "done"}]}, sender).relay_messages("S")
    assert event == {"kind": "event", "to_stage0": [1, 0, 0], "rid": "r@E", "attempt": 2, "index": 0, "token": 42,
                     "_sender": "S"}  # built from the checked fields: an item's own "kind" never gets through
    msg, sender = templates()["done"]
    assert DECODER.decode(msg, sender).relay_message("S") == {**msg, "_sender": "S"}
    failed = {"kind": "done", "rid": "r@E", "attempt": 2, "error": "lost"}
    assert DECODER.decode(failed, "S").relay_message("S") == {**failed, "_sender": "S"}


def test_dispatch_fields_go_to_the_head_as_it_places_them():
    msg, sender = templates()["dispatch"]
    req = DECODER.decode(msg, sender)
    assert req.to_dict() == {"rid": "r@E", "prompt_ids": [1, 2], "params": PARAMS, "max_new_tokens": 4, "stop": [],
                             "ignore_eos": False, "entry": "E", "attempt": 2, "resume_tokens": [], "resumed": True}


@pytest.mark.parametrize("kind", ["forward", "tokens", "link_broken"])
def test_a_step_or_notice_for_a_stage_not_here_is_not_checked_but_named(kind):
    msg, sender = templates()[kind]
    value = DECODER.decode({**msg, "to": [9, 0, msg["to"][2]], "x": "whatever"}, sender)
    assert value == NoStageHere(kind, StageAddress(9, 0, msg["to"][2]))


@pytest.mark.parametrize("kind", ["start", "cancel"])
def test_start_and_cancel_are_checked_in_full_whether_or_not_the_stage_is_here(kind):
    msg, sender = templates()[kind]
    asked = []
    decoder = PipelineDecoder(CFG, MAX_SEQ_LEN, lambda to, k: asked.append(to))
    assert type(decoder.decode({**msg, "to": [9, 0, 0]}, sender)) is TYPES[kind] and asked == []
    with pytest.raises(ProtocolError, match="rid"):
        decoder.decode({**msg, "to": [9, 0, 0], "rid": 7}, sender)


BAD_FIELDS = [  # (kind, field, bad value, what the error names)
    ("start", "to", [1, 0, 1], "start for a stage other than 0"),
    ("start", "to", [1, 0], "'to' must be"),
    ("start", "prompt_ids", [1, 100], "prompt_ids: out of range"),
    ("start", "prompt_ids", [], "lengths"),
    ("start", "max_new_tokens", 63, "lengths"),
    ("start", "max_new_tokens", True, "lengths"),
    ("start", "resume_tokens", [1] * 5, "resume tokens"),
    ("start", "rid", "r" * 161, "rid / entry"),
    ("start", "entry", None, "rid / entry"),
    ("start", "attempt", 2**31, "attempt"),
    ("start", "attempt", None, "attempt"),
    ("start", "stop", ["x"] * 17, "stop"),
    ("start", "ignore_eos", 1, "ignore_eos"),
    ("start", "params", {"top_p": 7}, "sampling"),
    ("forward", "x", torch.zeros(3, 9), "shape"),
    ("forward", "x", torch.zeros(3, 8, dtype=torch.int64), "float"),
    ("forward", "x", torch.zeros(3, 8, 1), "float"),
    ("forward", "rows", [[0, 3, 2], [4, 9, 1]], "out of range"),
    ("forward", "rows", [[0, 63, 2], [1, 9, 1]], "out of range"),
    ("forward", "rows", [[0, 0, 1]] * 5, "rows"),
    ("forward", "rows", [[0, 3, 2], [1, 9]], "row: 3 entries"),
    ("forward", "rids", ["a"], "rids"),
    ("forward", "steps", [-1], "steps"),
    ("forward", "samples", [None], "samples"),
    ("forward", "samples", [None, {"step": -1}], "sample spec"),
    ("forward", "samples", [None, {"step": 1, "params": {"temperature": math.nan}}], "sampling"),
    ("forward", "t", ["slow"], "stage times"),
    ("forward", "t", None, "stage times"),
    ("forward", "free", [4], "free: out of range"),
    ("forward", "free", [0] * 5, "free: too many slots"),
    ("tokens", "items", [{"rid": "b", "token": 1, "step": 1}] * 5, "token items"),
    ("tokens", "items", [{"rid": 1, "token": 1, "step": 1}], "token item"),
    ("tokens", "items", [{"rid": "b", "token": 100, "step": 1}], "token: out of range"),
    ("tokens", "items", [{"rid": "b", "token": 1, "step": "1"}], "token step"),
    ("tokens", "steps", None, "steps"),
    ("tokens", "t", [None], "stage times"),
    ("tokens", "to", [1, 0, 1], "not the last stage"),
    ("cancel", "rid", None, "cancel rid"),
    ("cancel", "attempt", "2", "cancel attempt"),
    ("cancel", "to", [1, 0, True], "'to' must be"),
    ("link_broken", "peer", "X", "link_broken peer"),
    ("link_broken", "to", [1, 0, 1], "not in this pipeline"),
    ("events", "items", {"rid": "r"}, "events: items"),
    ("events", "items", ["r"], "events: an item"),
    ("events", "items", [{"rid": "", "attempt": 1, "index": 0, "token": 1}], "request id"),
    ("events", "items", [{"rid": "r", "attempt": 1, "index": -1, "token": 1}], "events: attempt, index and token"),
    ("events", "to_stage0", [1, 0, math.inf], "'to_stage0' must be"),
    ("done", "rid", 5, "request id"),
    ("done", "attempt", -1, "done: attempt"),
    ("done", "to_stage0", None, "'to_stage0' must be"),
    ("done", "error", 5, "done: error"),
    ("done", "tokens", [1.5], "done: tokens"),
    ("done", "prompt_tokens", None, "done: prompt_tokens"),
    ("done", "text", None, "done: text, finish_reason"),
    ("done", "timings", [], "done: timings"),
    ("dispatch", "entry", "M", "dispatch: the entry must be the sender"),
    ("dispatch", "prompt_ids", [100], "prompt_ids: out of range"),
    ("dispatch", "max_new_tokens", 0, "dispatch: lengths"),
    ("dispatch", "resume_tokens", [1] * 5, "dispatch: more resume tokens"),
    ("dispatch", "stop", "x", "stop"),
    ("dispatch", "attempt", 0, "dispatch: attempt"),
    ("dispatch", "ignore_eos", "yes", "dispatch: ignore_eos"),
    ("dispatch", "rid", "", "request id"),
    ("dispatch", "params", None, "sampling params: a map"),
    ("placed", "attempt", 2**31 + 1, "placed: attempt"),
    ("placed", "error", {"code": "busy"}, "placed: error"),
    ("placed", "placement", {"epoch": 1, "replica": 0, "head": "H", "attempt": 3, "stages": []}, "placed: placement"),
]


@pytest.mark.parametrize("kind,field,value,why", BAD_FIELDS)
def test_a_bad_field_is_refused_with_an_error_that_names_it(kind, field, value, why):
    msg, sender = templates()[kind]
    with pytest.raises(ProtocolError, match=why):
        DECODER.decode({**msg, field: value}, sender)


@pytest.mark.parametrize("kind,sender,why", [
    ("forward", "B", "previous stage"), ("tokens", "B", "last stage"), ("link_broken", "A", "not in this pipeline"),
    ("dispatch", "M", "the entry must be the sender"),
])
def test_a_message_from_the_wrong_peer_is_refused(kind, sender, why):
    with pytest.raises(ProtocolError, match=why):
        DECODER.decode(templates()[kind][0], sender)


def test_an_unknown_kind_is_told_apart_from_a_malformed_message():
    with pytest.raises(UnknownKind):
        DECODER.decode({"kind": "gossip"}, "A")
    for msg in ({"kind": ["forward"]}, {"to": [1, 0, 0]}, ["forward"], None):
        with pytest.raises(ProtocolError) as e:
            DECODER.decode(msg, "A")
        assert not isinstance(e.value, UnknownKind)


def test_the_pipe_drops_what_does_not_decode_with_one_line_and_hands_the_rest_on(caplog):
    from hexswarm.serve.pipe import MessagePipe

    got = []
    pipe = MessagePipe(node=None, decode=DECODER.decode)
    pipe.on(CancelRequest, lambda value, sender: got.append((value, sender)))
    with caplog.at_level(logging.DEBUG, logger="hexswarm.pipe"):
        pipe._deliver(templates()["cancel"][0], "E")
        pipe._deliver({"kind": "cancel", "to": [1, 0, 0], "rid": None}, "E")
        pipe._deliver({"kind": "gossip"}, "E")
        pipe._deliver(templates()["events"][0], "A")  # decodes, but nothing here takes events
    assert got == [(CancelRequest(StageAddress(1, 0, 0), "r@E", 2), "E")]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["bad cancel message from E: cancel rid"]
    assert sum("unknown kind" in r.getMessage() for r in caplog.records) == 2


values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
    | st.builds(torch.zeros, st.integers(0, 3), st.integers(0, 9)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
KEYS = sorted({key for msg, _ in templates().values() for key in msg} | {"t", "free", "sent_at", "error"})


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(sorted(TYPES) + ["other", ""]), base=st.booleans(),
       fields=st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), values, max_size=8),
       sender=st.sampled_from(["A", "B", "C", "E", "H", "X"]))
def test_arbitrary_maps_raise_nothing_but_protocol_errors(kind, base, fields, sender):
    msg = {**(templates()[kind][0] if base and kind in TYPES else {}), **fields, "kind": kind}
    try:
        DECODER.decode(msg, sender)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(msg=values)
def test_arbitrary_values_raise_nothing_but_protocol_errors(msg):
    try:
        DECODER.decode(msg, "A")
    except ProtocolError:
        pass

"""A client's submit request, typed, and the one parser of its fields.

`hexswarm submit`, the `/hexswarm/submit/*` protocols and the OpenAI-compatible HTTP API all check a request with
`SubmitRequest.from_map`: one rule and one message per field, wherever the request comes from.  A bad field raises
`FieldError`, a UserError that names the field (HTTP's `param`).  What depends on the model (the prompt's length,
token ids below the vocabulary) is the entry's to check, after this; what only one front end has (HTTP's `n`,
the CLI's `--concurrency`) stays with it.  Torch-free: HTTP worker processes and the CLI import it.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, fields
from typing import Any, Callable

from hexswarm.errors import UserError

MAX_STOP_STRINGS = 16  # stop strings one request may give (the submit protocols, HTTP, a stage 0)
MAX_REQUEST_ID = 128  # characters of a client's request id

_shown = reprlib.Repr()
_shown.maxstring = _shown.maxother = 40
_shown.maxlist = 8


def _name(field: str) -> str:
    return field if field.startswith("-") else f"'{field}'"  # a CLI flag is said as typed


class FieldError(UserError):
    """A bad field of a submit request, in one line: `field` names it, `rule` says what it must be."""

    ABSENT = object()  # no value given

    def __init__(self, field: str, rule: str, value: Any = ABSENT):
        self.field, self.rule, self.value = field, rule, value
        got = "" if value is FieldError.ABSENT else ", got " + " ".join(_shown.repr(value).split())
        super().__init__(f"{_name(field)} must be {rule}{got}")

    def renamed(self, name: str) -> FieldError:
        """The same error said of a front end's own name for the field (HTTP's `max_tokens`, a CLI flag)."""
        return FieldError(name, self.rule, self.value)


def is_int(v: Any) -> bool:
    return type(v) is int  # not bool (type(True) is bool), not a float that happens to be whole


def is_number(v: Any, finite: bool = True) -> bool:
    if type(v) is float:
        return math.isfinite(v) or not finite
    return type(v) is int and -2**1023 < v < 2**1023  # within a float's range: float(v) must not overflow


def _is_token_ids(v: Any) -> bool:
    return type(v) is list and all(is_int(t) and t >= 0 for t in v)


@dataclass(frozen=True)
class Rule:
    """What one field must be: `accepts` a value, `rule` says so in words, `canonical` makes the value kept
    (None: the value as given)."""

    field: str
    rule: str
    accepts: Callable[[Any], bool]
    canonical: Callable[[Any], Any] | None = None

    def check(self, value: Any) -> Any:
        if not self.accepts(value):
            raise self.error(value)
        return value if self.canonical is None else self.canonical(value)

    def error(self, value: Any = FieldError.ABSENT) -> FieldError:
        return FieldError(self.field, self.rule, value)


PROMPT = Rule("prompt", "a non-empty string", lambda v: type(v) is str and v != "")
MAX_NEW_TOKENS = Rule("max_new_tokens", "an integer >= 1", lambda v: is_int(v) and v >= 1)
# no upper bound (vLLM's rule, not OpenAI's 2): a request any earlier install took stays valid, and a stage must take
# what any entry of the swarm accepted
TEMPERATURE = Rule("temperature", "a finite number >= 0", lambda v: is_number(v) and v >= 0, float)
# -1 (vLLM's) and 0 both mean no cut; bounded: it travels in msgpack (no ints past 64 bits)
TOP_K = Rule("top_k", "an integer in [-1, 2^31) (-1 or 0: no cut)", lambda v: is_int(v) and -1 <= v < 2**31,
             lambda v: max(v, 0))
TOP_P = Rule("top_p", "a number in (0, 1]", lambda v: is_number(v) and 0 < v <= 1, float)
# OpenAI's seeds are int64; the counter-based draw takes 63 bits, so a negative seed is kept mod 2^63
SEED = Rule("seed", "an integer in [-2^63, 2^63)", lambda v: is_int(v) and -2**63 <= v < 2**63,
            lambda v: v & (2**63 - 1))
STOP = Rule("stop", f"a list of at most {MAX_STOP_STRINGS} non-empty strings",
            lambda v: type(v) is list and len(v) <= MAX_STOP_STRINGS and all(type(s) is str and s for s in v), tuple)
IGNORE_EOS = Rule("ignore_eos", "true or false", lambda v: type(v) is bool)
STREAM = Rule("stream", "true or false", lambda v: type(v) is bool)
REQUEST_ID = Rule("request_id", f"a string of at most {MAX_REQUEST_ID} characters",
                  lambda v: type(v) is str and len(v) <= MAX_REQUEST_ID, lambda v: v or None)  # "": none given
TIMEOUT_S = Rule("timeout_s", "a positive number of seconds", lambda v: is_number(v, finite=False) and v > 0, float)
RESUMED = Rule("resumed", "true or false", lambda v: type(v) is bool)
RESUME_TOKENS = Rule("resume_tokens", "a list of at most max_new_tokens token ids of the model", _is_token_ids, tuple)


def check_sampling(temperature: Any, top_k: Any, top_p: Any, seed: Any) -> tuple[float, int, float, int]:
    """The sampling values as the rules above keep them (runtime/sampling.py's SamplingParams.validate)."""
    return TEMPERATURE.check(temperature), TOP_K.check(top_k), TOP_P.check(top_p), SEED.check(seed)


@dataclass(frozen=True)
class SubmitRequest:
    """What a client may send to have a prompt generated (the submit protocols' map, serve/submit.py).
    Defaults are the protocol's: greedy, 64 tokens; HTTP fills in OpenAI's before parsing."""

    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate past end-of-sequence tokens up to max_new_tokens (vLLM's option)
    stream: bool = False
    request_id: str | None = None  # None: the entry names it
    timeout_s: float | None = None  # None: the entry's longest
    resumed: bool = False  # a client's failover of a request an entry accepted
    resume_tokens: tuple[int, ...] = ()  # with resumed only: the tokens the client already has

    @classmethod
    def from_map(cls, msg: Any) -> SubmitRequest:
        """Every field of a client's map checked once; FieldError names the first bad one.  A field that is
        absent or null takes its default; fields this request does not know are ignored."""
        if not isinstance(msg, dict):
            raise UserError("a submit request is a map")
        values = {}
        for rule in _RULES:
            raw = msg.get(rule.field)
            if rule is RESUME_TOKENS and values.get("resumed") is not True:
                continue  # resume tokens mean nothing outside a resubmission: not even checked
            if raw is not None:  # no truth test on what a peer sent: a tensor in a field must not reach one
                values[rule.field] = rule.check(raw)
        if "prompt" not in values:
            raise PROMPT.error()
        req = cls(**values)
        if len(req.resume_tokens) > req.max_new_tokens:
            raise RESUME_TOKENS.error(list(req.resume_tokens))
        return req

    def to_map(self) -> dict:
        """The map `from_map` reads back as this request (what a client sends)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def sampling_params(self) -> dict:
        """The sampling values as a stage's `params` map (runtime/sampling.py's SamplingParams.to_dict)."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}


_RULES = (PROMPT, MAX_NEW_TOKENS, TEMPERATURE, TOP_K, TOP_P, SEED, STOP, IGNORE_EOS, STREAM, REQUEST_ID, TIMEOUT_S,
          RESUMED, RESUME_TOKENS)

"""One rule and one message per submit field (hexswarm/net/submit_request.py), whichever front end a request
comes through: `hexswarm submit`, the submit protocols' entry (`SubmitService.parse`), the OpenAI HTTP API."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hexswarm.errors import UserError
from hexswarm.net.submit_request import MAX_STOP_STRINGS, FieldError, SubmitRequest
from entry_port_fake import port_of

DEAD_PEER = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"  # nothing listens
VOCAB = 256


@dataclass
class Case:
    field: str
    value: object
    message: str
    also: dict = field(default_factory=dict)  # other fields the bad one needs to mean anything


CASES = [
    Case("prompt", "", "'prompt' must be a non-empty string, got ''"),
    Case("max_new_tokens", 0, "'max_new_tokens' must be an integer >= 1, got 0"),
    Case("temperature", -1.0, "'temperature' must be a finite number >= 0, got -1.0"),
    Case("temperature", float("inf"), "'temperature' must be a finite number >= 0, got inf"),
    Case("top_k", -2, "'top_k' must be an integer in [-1, 2^31) (-1 or 0: no cut), got -2"),
    Case("top_p", 1.5, "'top_p' must be a number in (0, 1], got 1.5"),
    Case("top_p", 0.0, "'top_p' must be a number in (0, 1], got 0.0"),
    Case("seed", 2**63, "'seed' must be an integer in [-2^63, 2^63), got 9223372036854775808"),
    Case("stop", [""], "'stop' must be a list of at most 16 non-empty strings, got ['']"),
    Case("stop", ["x"] * (MAX_STOP_STRINGS + 1),
         "'stop' must be a list of at most 16 non-empty strings, got ['x', 'x', 'x', 'x', 'x', 'x', 'x', 'x', ...]"),
    Case("ignore_eos", 1, "'ignore_eos' must be true or false, got 1"),
    Case("stream", "yes", "'stream' must be true or false, got 'yes'"),
    Case("request_id", "r" * 129, "'request_id' must be a string of at most 128 characters, "
                                  "got 'rrrrrrrrrrrrrrrrr...rrrrrrrrrrrrrrrrrr'"),
    Case("timeout_s", 0.0, "'timeout_s' must be a positive number of seconds, got 0.0"),
    Case("resumed", "yes", "'resumed' must be true or false, got 'yes'"),
    Case("resume_tokens", [-1], "'resume_tokens' must be a list of at most max_new_tokens token ids of the model, "
                                "got [-1]", {"resumed": True}),
]


def _ids(case: Case) -> str:
    return f"{case.field}={case.value!r}"[:40]


# --- (a) hexswarm submit --------------------------------------------------------------------------------


CLI_FLAGS = {"prompt": "--prompt", "max_new_tokens": "--max-new-tokens", "temperature": "--temperature",
             "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed", "stop": "--stop",
             "request_id": "--request-id", "timeout_s": "--timeout"}


def _cli_args(case: Case) -> list[str]:
    flags = {"prompt": ["hi"], "timeout_s": ["5"]}  # a short wait: a check that let a bad value pass ends soon
    flags[case.field] = [str(v) for v in case.value] if isinstance(case.value, list) else [str(case.value)]
    args = ["submit", "--peer", DEAD_PEER]
    for name, values in flags.items():
        for v in values:
            args += [CLI_FLAGS[name], v]
    return args


@pytest.fixture(scope="module")
def cli():
    from hexswarm.cli.app import _register_commands, app

    _register_commands()
    return app


@pytest.mark.parametrize("case", [c for c in CASES if c.field in CLI_FLAGS], ids=_ids)
def test_cli_refuses_a_bad_field_with_the_entrys_message_before_sending(cli, case):
    result = CliRunner().invoke(cli, _cli_args(case))
    # a UserError: `hexswarm` prints it as one line `error: ...`, exit code 2 (cli/app.py main)
    assert result.exit_code != 0 and isinstance(result.exception, FieldError), (result.exception, result.output)
    assert str(result.exception) == case.message and result.exception.field == case.field
    assert "Traceback" not in result.output


def test_cli_error_is_one_line_on_stderr_and_exit_2():
    from conftest import run_cli

    p = run_cli("submit", "--peer", DEAD_PEER, "--prompt", "hi", "--temperature", "-1", timeout=60)
    assert p.returncode == 2 and p.stderr == "error: 'temperature' must be a finite number >= 0, got -1.0\n", p.stderr


# --- (b) the submit protocols' entry ----------------------------------------------------------------------


def _service():
    from hexswarm.serve.submit import SubmitService

    svc = SubmitService(None)
    svc.port = port_of(SimpleNamespace(cfg=SimpleNamespace(max_position_embeddings=64, vocab_size=VOCAB),
                                       settings=SimpleNamespace(max_seq_len=64)))
    return svc


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_the_entry_refuses_a_bad_field_with_the_same_message(case):
    with pytest.raises(FieldError) as err:
        _service().parse({"prompt": "hi", **case.also, case.field: case.value})
    assert str(err.value) == case.message and err.value.field == case.field


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400, True, "1", [1]])
@pytest.mark.parametrize("name", ["max_new_tokens", "temperature", "top_k", "top_p", "seed"])
def test_the_entry_takes_only_numbers_of_their_range(name, value):
    if name == "max_new_tokens" and value == 10**400:
        return  # valid: a budget the entry cuts to the context
    with pytest.raises(FieldError) as err:
        _service().parse({"prompt": "hi", name: value})
    assert err.value.field == name and "\n" not in str(err.value)


def test_token_ids_past_the_vocabulary_are_the_entrys_check_with_the_same_message():
    (case,) = [c for c in CASES if c.field == "resume_tokens"]
    with pytest.raises(FieldError) as err:
        _service().parse({"prompt": "hi", "resumed": True, "resume_tokens": [VOCAB]})
    assert str(err.value) == case.message.replace("[-1]", f"[{VOCAB}]")


def test_the_entrys_map_keeps_its_shape_and_defaults():
    req = _service().parse({"prompt": "hi", "top_k": -1, "seed": -1, "resume_tokens": [1]})
    assert req.pop("rid")  # a random id when the client gives none
    assert req == {"prompt": "hi", "params": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 2**63 - 1},
                   "stop": [], "ignore_eos": False, "max_new_tokens": 64, "client_tokens": [], "stream": False,
                   "resumed": False, "deadline_s": 600.0}


# --- (c) the OpenAI HTTP API ------------------------------------------------------------------------------


HTTP_NAMES = {"max_new_tokens": "max_tokens"}  # OpenAI's name where it differs
HTTP_FIELDS = {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos", "stream"}


class FakeBackend:
    """What HttpApi needs of a node; any request that passes the checks is a test failure."""

    model_name, model_id, max_seq_len, created, chat = "m", "f" * 16, 64, 0, None

    async def serve(self, msg, emit, kind, put=None):
        raise AssertionError(f"a bad request reached the swarm: {msg}")

    def count_http(self, route, status):
        pass


def _post(body: dict) -> tuple[int, dict]:
    from hexswarm.api.http_api import HttpApi

    sent = []

    async def main():
        messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await trio.sleep_forever()

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        await HttpApi(FakeBackend(), token=None)(scope, receive, send)

    trio.run(main)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


@pytest.mark.parametrize("case", [c for c in CASES if c.field in HTTP_FIELDS], ids=_ids)
def test_http_refuses_a_bad_field_with_the_same_message_and_names_it(case):
    name = HTTP_NAMES.get(case.field, case.field)
    status, body = _post({"model": "m", "prompt": "hi", name: case.value})
    assert status == 400, body
    err = body["error"]
    assert err["message"] == case.message.replace(f"'{case.field}'", f"'{name}'") and err["param"] == name, err
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_value"


def test_http_chat_names_max_completion_tokens_when_that_was_sent():
    from hexswarm.api.http_api import ApiError, parse_request

    with pytest.raises(ApiError) as err:
        parse_request({"max_completion_tokens": 0, "max_tokens": 5}, "hi", "r",
                      max_tokens_keys=("max_completion_tokens", "max_tokens"), default_max=8)
    assert err.value.param == "max_completion_tokens"
    assert err.value.message == "'max_completion_tokens' must be an integer >= 1, got 0"


def test_http_fills_in_openais_defaults():
    from hexswarm.api.http_api import parse_request

    def parsed(body):
        return parse_request(body, "hi", "r", max_tokens_keys=("max_tokens",), default_max=16)

    sampled = parsed({"stop": "x"})
    assert (sampled.temperature, sampled.max_new_tokens, sampled.stop) == (1.0, 16, ("x",))
    assert parsed({}).seed != parsed({}).seed  # a random seed when sampling without one
    assert parsed({"temperature": 0}).seed == 0 and parsed({"seed": 5}).seed == 5
    vllm = parsed({"top_k": -1, "seed": -1, "stream": None})  # -1: no cut; an int64 seed; null: the default
    assert (vllm.top_k, vllm.seed, vllm.stream) == (0, 2**63 - 1, False)


# --- the typed request itself -----------------------------------------------------------------------------


def test_generate_says_the_same_rules_of_its_own_flags():
    from hexswarm.runtime.sampling import SamplingParams

    with pytest.raises(FieldError) as err:
        SamplingParams(top_p=1.5).validate()
    (case,) = [c for c in CASES if c.field == "top_p" and c.value == 1.5]
    assert str(err.value) == case.message
    assert str(err.value.renamed("--top-p")) == "--top-p must be a number in (0, 1], got 1.5"


def test_the_module_imports_no_torch():
    import subprocess

    code = "import sys, hexswarm.net.submit_request; print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "False", p.stderr


_any = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**64, max_value=2**64),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                 st.lists(st.text(max_size=3), max_size=3), st.lists(st.integers(-2, 300), max_size=3))
_valid = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20)}, optional={
    "max_new_tokens": st.integers(1, 2**40), "temperature": st.floats(0, 2), "top_k": st.integers(-1, 2**31 - 1),
    "top_p": st.floats(0, 1, exclude_min=True), "seed": st.integers(-2**63, 2**63 - 1),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=MAX_STOP_STRINGS), "ignore_eos": st.booleans(),
    "stream": st.booleans(), "request_id": st.text(max_size=128), "timeout_s": st.floats(0, 1e6, exclude_min=True),
    "resumed": st.booleans(), "resume_tokens": st.lists(st.integers(0, 2**31), max_size=3)})


@settings(max_examples=300, deadline=None)
@given(st.one_of(_valid, st.dictionaries(st.sampled_from([c.field for c in CASES] + ["other"]), _any, max_size=6)))
def test_any_accepted_map_round_trips_and_anything_else_is_one_line(msg):
    try:
        req = SubmitRequest.from_map(msg)
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert SubmitRequest.from_map(req.to_map()) == req
    assert SubmitRequest.from_map(json.loads(json.dumps(req.to_map()))) == req  # and over HTTP's JSON

"""The error vocabulary: one table gives every code its HTTP status, metric outcome and client retry rule."""

import pytest

from hexswarm.net import codec
from hexswarm.net.error_codes import MEANINGS, ErrorCode, meaning
from hexswarm.net.protocols import error_frame
from hexswarm.api.client import RETRY_CODES
from hexswarm.api.http_api import swarm_error
from entry_port_fake import port_of


def test_every_code_has_a_meaning():
    assert set(MEANINGS) == set(ErrorCode)


@pytest.mark.parametrize("code, status, type_, outcome", [
    ("bad_request", 400, "invalid_request_error", "bad_request"),
    ("forbidden", 403, "permission_error", "forbidden"),
    ("busy", 429, "rate_limit_error", "busy"),
    ("no_layout", 503, "service_unavailable_error", "unavailable"),
    ("no_head", 503, "service_unavailable_error", "unavailable"),
    ("failed", 503, "service_unavailable_error", "failed"),
    ("timeout", 504, "timeout_error", "timeout"),
    ("internal", 500, "server_error", "error"),
    ("replaced", 500, "server_error", "error"),
    ("no_such_code", 500, "server_error", "error"),  # a peer's code we do not know
    (None, 500, "server_error", "error"),
])
def test_a_code_off_the_wire_means_one_thing_everywhere(code, status, type_, outcome):
    m = meaning(code)
    assert (m.http_status, m.http_type, m.outcome) == (status, type_, outcome)
    err = swarm_error({"code": code, "message": "x"})
    assert (err.status, err.type) == (status, type_)


def test_clients_submit_again_after_exactly_these():
    assert RETRY_CODES == {"busy", "no_head", "no_layout", "replaced"}


def test_frames_carry_plain_strings():
    frame = codec.decode(codec.encode(error_frame(ErrorCode.BUSY, "retry after 2 s")))
    assert frame == {"error": {"code": "busy", "message": "retry after 2 s"}}
    assert type(frame["error"]["code"]) is str and frame["error"]["code"] == ErrorCode.BUSY


def test_an_entry_cancels_the_latest_placement_of_a_request():
    """What the HTTP API calls when its client goes away (SubmitService.cancel): a cancel to the stage 0 of the
    request's newest attempt, by the request's wire id; nothing for a request it does not know."""
    from types import SimpleNamespace

    from hexswarm.serve.submit import SubmitService

    sent = []
    server = SimpleNamespace(me="entry-peer-0123456789", pipe=SimpleNamespace(send=lambda p, m: sent.append((p, m))),
                             node=SimpleNamespace(config=SimpleNamespace(max_queue=4)))
    service = SubmitService(port_of(server))
    service.cancel("r1")
    assert sent == []
    for attempt, peer in ((1, "S0a"), (2, "S0b")):
        service._remember("r1", {"stages": [{"peer": peer}], "epoch": 3, "replica": 1, "attempt": attempt})
    service.cancel("r1")
    assert sent == [("S0b", {"kind": "cancel", "to": [3, 1, 0], "rid": service.wire_id("r1"), "attempt": 2})]

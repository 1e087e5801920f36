"""Local links: stage engines on one host hand forward and tokens messages to each other over
Unix sockets of this user (runtime/local_link.py), and fall back to the node when there is none."""

from __future__ import annotations

import os
import queue
import socket
import time

import pytest
import torch

from hexswarm.errors import ProtocolError
from hexswarm.net import codec
from hexswarm.runtime.local_link import LinkSpec, LocalLinks, private_dir, read_message, write_message
from hexswarm.runtime.local_pipeline import LocalPipeline
from hexswarm.runtime.offline import GenerateJob, generate

PROMPTS = ["Hello, world!", "Once upon a time", "The quick brown fox"]


def test_a_message_and_its_tensors_cross_as_they_are():
    a, b = socket.socketpair()
    x = torch.randn(5, 64).to(torch.bfloat16)
    msg = {"kind": "forward", "rows": [[0, 3, 5]], "x": x, "empty": torch.zeros(0, 64), "t": [0.5]}
    write_message(a, msg)
    got = read_message(b)
    assert got["kind"] == "forward" and got["rows"] == [[0, 3, 5]] and got["t"] == [0.5]
    assert got["x"].dtype == torch.bfloat16 and torch.equal(got["x"], x) and got["empty"].shape == (0, 64)
    a.close()
    assert read_message(b) is None  # the end of the stream


def test_a_tensor_header_that_lies_is_refused():
    a, b = socket.socketpair()
    body = codec.encode({"m": {"kind": "forward"}, "t": [["x", "float64", [2]]]})
    a.sendall(codec.FRAME_HEADER.pack(len(body)) + body)
    with pytest.raises(ProtocolError, match="dtype"):
        read_message(b)


def test_links_deliver_with_the_sender_and_fall_back_when_the_stage_is_not_here(tmp_path):
    run_dir = str(tmp_path / "run")
    got: queue.Queue = queue.Queue()
    receiver = LocalLinks(LinkSpec("peerB", (3, 0, 1), run_dir), got.put)
    sender = LocalLinks(LinkSpec("peerA", (3, 0, 0), run_dir), lambda m: None)
    try:
        assert oct(os.stat(run_dir).st_mode & 0o777) == "0o700"
        assert sender.send("peerB", (3, 0, 1), {"kind": "forward", "x": torch.ones(2, 4)})
        msg = got.get(timeout=5)
        assert msg["_sender"] == "peerA" and torch.equal(msg["x"], torch.ones(2, 4)) and msg["sent_at"] <= time.time()
        assert not sender.send("peerC", (3, 0, 1), {"kind": "forward"})  # no such stage on this host
        assert not sender.send("peerB", (4, 0, 1), {"kind": "forward"})  # nor that epoch
        receiver.close()
        time.sleep(0.1)
        # the receiver went away: within a send or two the link is dropped and the node path is used
        results = [sender.send("peerB", (3, 0, 1), {"kind": "forward", "x": torch.ones(256, 256)}) for _ in range(3)]
        assert results[-1] is False
    finally:
        sender.close()
        receiver.close()


def test_a_directory_others_may_enter_is_not_used(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    assert not private_dir(str(shared))
    links = LocalLinks(LinkSpec("peerA", (1, 0, 0), str(shared)), lambda m: None)
    assert not links.send("peerB", (1, 0, 1), {"kind": "forward"})
    assert not os.listdir(shared)  # nothing listens there


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "engine-processes"])
def test_stages_linked_on_one_host_match_generate(tiny_model, tmp_path, processes):
    pipe = LocalPipeline(tiny_model, [(1, 1), (1, 2), (1, 1)], processes=processes, links_dir=str(tmp_path / "run"))
    try:
        for i, p in enumerate(PROMPTS):
            pipe.start(f"r{i}", p, 6)
        results = pipe.wait(len(PROMPTS), timeout=120)
    finally:
        pipe.close()
    assert pipe.forward_rows == []  # every step crossed on the links, none through send()
    for i, p in enumerate(PROMPTS):
        assert results[f"r{i}"]["tokens"] == generate(GenerateJob(model_dir=str(tiny_model), prompt=p, max_new_tokens=6))["tokens"]

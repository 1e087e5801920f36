"""End to end: node processes on 127.0.0.1 serving a tiny model; outputs equal `generate`."""

from __future__ import annotations

import signal
import time

import pytest

from conftest import run_cli
from hexswarm.launcher import FAST_TIMINGS, LocalSwarm, wait_for
from swarmutil import PROMPTS, reference, submit_many

PINNED = {"hetero_config": [2, 1], "pp_partition": [2, 2], "replicas": 1}
NEW = 10


@pytest.fixture(scope="module")
def swarm3(tiny_model, tmp_path_factory):
    sw = LocalSwarm(tmp_path_factory.mktemp("swarm3"), tiny_model, [2, 1, 1], serve_layout=PINNED,
                    extra={"dispatch_wait_s": 5.0, "local_links": False})  # stage traffic over the network path;
    # the other swarm tests run with local links between the stages (the default: all nodes are on this host)
    sw.start()
    try:
        sw.wait_layout(90)
        yield sw
    finally:
        sw.stop()


def test_layout_has_two_stages_one_at_tp2(swarm3):
    st = swarm3.status(swarm3.nodes[2])
    (replica,) = st["replicas"]
    assert replica["hetero_config"] == [2, 1] and replica["pp_partition"] == [2, 2]
    tp2_peer = replica["stages"][0]["peer"]
    assert tp2_peer == swarm3.nodes[0].peer_id  # the only node with two devices
    # every node agrees on the head and the epoch
    sts = [swarm3.status(n) for n in swarm3.nodes]
    assert len({s["head"] for s in sts}) == 1 and len({s["layout"]["epoch"] for s in sts}) == 1


def test_eight_concurrent_prompts_through_different_peers_match_generate(swarm3, tiny_model):
    jobs = [(swarm3.nodes[i % 3].addr, {"prompt": p, "max_new_tokens": NEW}) for i, p in enumerate(PROMPTS)]
    results = submit_many(jobs)
    for (addr, req), res in zip(jobs, results):
        assert "done" in res, res
        done = res["done"]
        ref = reference(tiny_model, req["prompt"], NEW)
        assert done["tokens"] == ref["tokens"], req["prompt"]
        assert done["text"] == ref["text"] and done["prompt_tokens"] == ref["prompt_tokens"]
        assert done["layout"] == {"hetero_config": [2, 1], "pp_partition": [2, 2]}
        assert len(done["timings"]["stage_compute_s"]) == 2 and all(t > 0 for t in done["timings"]["stage_compute_s"])
    # activations and tokens took the direct encrypted path (net/direct.py), not libp2p streams
    assert any("direct encrypted path" in n.log() for n in swarm3.nodes)


def test_sampling_with_seed_matches_generate(swarm3, tiny_model):
    from hexswarm.runtime.sampling import SamplingParams

    req = {"prompt": "Once upon a time", "max_new_tokens": NEW, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 5}
    (res,) = submit_many([(swarm3.nodes[1].addr, req)])
    ref = reference(tiny_model, req["prompt"], NEW, SamplingParams(0.8, 40, 0.9, 5))
    assert res["done"]["tokens"] == ref["tokens"]


def test_cli_submit_stream_and_json(swarm3, tiny_model):
    import json

    p = run_cli("submit", "--peer", swarm3.nodes[1].addr, "--prompt", "Hello, world!", "--max-new-tokens", str(NEW),
                "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    ref = reference(tiny_model, "Hello, world!", NEW)
    assert out["tokens"] == ref["tokens"]
    assert {"request_id", "replica", "timings", "layout", "finish_reason", "prompt_tokens"} <= set(out)
    s = run_cli("submit", "--peer", swarm3.nodes[2].addr, "--prompt", "Hello, world!", "--max-new-tokens", str(NEW),
                "--stream")
    assert s.returncode == 0, s.stderr
    assert s.stdout.rstrip("\n") == ref["text"]


@pytest.mark.parametrize("request_,needle", [
    ({"prompt": "word " * 600, "max_new_tokens": 4}, "prompt has"),
    ({"prompt": "x" * 1_000_000, "max_new_tokens": 4}, "characters"),  # refused before it is tokenized
    ({"prompt": "hi", "top_p": 5.0}, "top_p"),
    ({"prompt": "", "max_new_tokens": 4}, "prompt"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_requests_get_clear_errors(swarm3, request_, needle):
    t0 = time.monotonic()
    (res,) = submit_many([(swarm3.nodes[0].addr, request_)], timeout=30)
    assert "error" in res and needle in res["error"]["message"], res
    assert time.monotonic() - t0 < 15


def test_cli_rejects_bad_sampling_values_before_sending(swarm3):
    p = run_cli("submit", "--peer", swarm3.nodes[0].addr, "--prompt", "hi", "--temperature", "-1")
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr


def test_submit_without_committed_layout_is_refused_not_hung(tiny_model, tmp_path):
    # one node that can never hold the pinned TP-4 stage: no layout ever commits
    sw = LocalSwarm(tmp_path, tiny_model, [1], serve_layout={"hetero_config": [4], "pp_partition": [4]},
                    extra={"dispatch_wait_s": 2.0})
    sw.start()
    try:
        t0 = time.monotonic()
        p = run_cli("submit", "--peer", sw.nodes[0].addr, "--prompt", "hi", timeout=60)
        assert p.returncode == 2 and "no committed layout" in p.stderr, p.stderr
        assert time.monotonic() - t0 < 30
    finally:
        sw.stop()


def test_join_triggers_new_epoch_and_requests_during_change_complete(tiny_model, tmp_path):
    sw = LocalSwarm(tmp_path, tiny_model, [2, 1, 1], serve_layout=PINNED)
    sw.start()
    try:
        first = sw.wait_layout(90)["layout"]["epoch"]
        import threading

        results: list = []
        worker = threading.Thread(target=lambda: results.extend(submit_many(
            [(sw.nodes[i % 3].addr, {"prompt": p, "max_new_tokens": 24}) for i, p in enumerate(PROMPTS)])))
        worker.start()
        sw.add_node(1)  # the fourth node joins while requests run
        st = sw.wait_layout(90, min_epoch=first + 1)
        assert sw.nodes[3].peer_id in st["view"]
        worker.join(120)
        assert len(results) == len(PROMPTS) and all("done" in r for r in results), results
        for prompt, res in zip(PROMPTS, results):
            assert res["done"]["tokens"] == reference(tiny_model, prompt, 24)["tokens"]
        # and the new epoch serves
        (after,) = submit_many([(sw.nodes[3].addr, {"prompt": "Hello, world!", "max_new_tokens": 6})])
        assert after["done"]["epoch"] > first
    finally:
        sw.stop()


def test_killing_the_head_elects_another_and_serving_resumes(tiny_model, tmp_path):
    sw = LocalSwarm(tmp_path, tiny_model, [2, 2, 1, 1], serve_layout=PINNED)
    sw.start()
    try:
        st = sw.wait_layout(90)
        head = next(n for n in sw.nodes if n.peer_id == st["head"])
        head.kill(signal.SIGKILL)
        t0 = time.monotonic()
        survivors = [n for n in sw.nodes if n is not head]
        deadline = 2 * FAST_TIMINGS["down_after_s"]  # two heartbeat timeouts

        def new_head() -> bool:
            try:
                heads = {sw.status(n)["head"] for n in survivors}
            except Exception:
                return False
            return len(heads) == 1 and head.peer_id not in heads

        assert wait_for(new_head, deadline + 5, 0.1)
        # 0.5 s of slack for asking three nodes over the network
        assert time.monotonic() - t0 <= deadline + 0.5, "head change took longer than 2 heartbeat timeouts"
        (res,) = submit_many([(survivors[0].addr, {"prompt": "Hello, world!", "max_new_tokens": 8})], timeout=90)
        assert "done" in res, res
        assert res["done"]["tokens"] == reference(tiny_model, "Hello, world!", 8)["tokens"]
    finally:
        sw.stop()


def test_planned_layout_without_pin_serves(tiny_model, tmp_path):
    sw = LocalSwarm(tmp_path, tiny_model, [2, 1, 1])
    sw.start()
    try:
        st = sw.wait_layout(90)
        assert st["layout"]["predicted"].get("source") == "scheduler"
        (res,) = submit_many([(sw.nodes[2].addr, {"prompt": "Hello, world!", "max_new_tokens": 8})])
        assert res["done"]["tokens"] == reference(tiny_model, "Hello, world!", 8)["tokens"]
    finally:
        sw.stop()


def test_trace_lists_every_stage_with_compute_time(swarm3):
    import json

    p = run_cli("submit", "--peer", swarm3.nodes[2].addr, "--prompt", "Once upon a time", "--max-new-tokens", "6",
                "--json")
    done = json.loads(p.stdout)
    t = run_cli("trace", done["request_id"], "--peer", swarm3.nodes[2].addr, "--json")
    assert t.returncode == 0, t.stderr
    trace = json.loads(t.stdout)
    stages = {(s["stage"], s["peer"]) for s in trace["spans"]}
    assert stages == {(i, st["peer"]) for i, st in enumerate(done["stages"])}
    for s in trace["spans"]:
        assert s["steps"] == 6 and s["compute_s"] > 0 and s["queue_s"] >= 0 and s["net_in_s"] >= 0
    table = run_cli("trace", done["request_id"], "--peer", swarm3.nodes[2].addr)
    assert table.returncode == 0 and "compute s" in table.stdout
    unknown = run_cli("trace", "no-such-request", "--peer", swarm3.nodes[2].addr)
    assert unknown.returncode == 2 and "unknown_request" in unknown.stderr


def test_swarm_client_reuses_one_connection_for_many_requests(swarm3, tiny_model, monkeypatch):
    """Sequential and concurrent requests through one SwarmClient: one dial, one connection, right tokens;
    streamed text pieces add up to the final text."""
    import trio

    import hexswarm.api.client as client_mod
    from hexswarm.api.client import SwarmClient

    dials = []
    real_dial = client_mod.dial

    async def counting_dial(host, info, timeout):
        dials.append(str(info.peer_id))
        await real_dial(host, info, timeout=timeout)

    monkeypatch.setattr(client_mod, "dial", counting_dial)
    entry = swarm3.nodes[1]
    prompts = PROMPTS[:6]
    results: dict = {}
    streamed: dict = {}

    async def main():
        async with SwarmClient([entry.addr]) as client:
            for p in prompts[:2]:  # one after another
                results[p] = await client.submit({"prompt": p, "max_new_tokens": NEW, "stream": True},
                                                 on_frame=lambda f, p=p: streamed.setdefault(p, []).append(f))
            async with trio.open_nursery() as nursery:  # and at once
                for p in prompts[2:]:
                    async def one(p=p):
                        results[p] = await client.submit({"prompt": p, "max_new_tokens": NEW})
                    nursery.start_soon(one)
            conns = client.host.get_network().connections.get(client.peers[entry.addr].peer_id)
            results["_connections"] = len(conns) if isinstance(conns, (list, tuple, set, dict)) else int(bool(conns))

    trio.run(main)
    assert dials == [entry.peer_id] and results["_connections"] == 1
    for p in prompts:
        ref = reference(tiny_model, p, NEW)
        assert results[p]["done"]["tokens"] == ref["tokens"], p
    for p, frames in streamed.items():
        tokens = [f for f in frames if "token" in f]
        assert [f["index"] for f in tokens] == list(range(len(tokens)))
        text = "".join(f["text"] for f in tokens)
        assert results[p]["done"]["text"].startswith(text) and len(results[p]["done"]["text"]) - len(text) <= 1


def test_swarm_client_fails_over_to_the_next_entry(swarm3, tiny_model):
    import trio

    from hexswarm.net.identity import generate
    from hexswarm.net.ports import free_port
    from hexswarm.api.client import SwarmClient

    nobody = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{generate().peer_id.to_base58()}"

    async def main():
        async with SwarmClient([nobody, swarm3.nodes[2].addr], dial_timeout=2) as client:
            return await client.submit({"prompt": "Hello, world!", "max_new_tokens": NEW})

    res = trio.run(main)
    assert res["done"]["tokens"] == reference(tiny_model, "Hello, world!", NEW)["tokens"]


def test_cli_submit_several_prompts_over_one_client(swarm3, tiny_model, tmp_path):
    import json

    f = tmp_path / "prompts.txt"
    f.write_text("Once upon a time\n\nThe quick brown fox\n")
    p = run_cli("submit", "--peer", swarm3.nodes[0].addr, "--prompt", "Hello, world!", "--prompts-file", str(f),
                "--max-new-tokens", str(NEW), "--json", "--request-id", "batch")
    assert p.returncode == 0, p.stderr
    outs = [json.loads(line) for line in p.stdout.splitlines()]
    assert [o["request_id"] for o in outs] == ["batch-0", "batch-1", "batch-2"]
    for o, prompt in zip(outs, ["Hello, world!", "Once upon a time", "The quick brown fox"]):
        assert o["tokens"] == reference(tiny_model, prompt, NEW)["tokens"], prompt
    bad = run_cli("submit", "--peer", swarm3.nodes[0].addr, "--prompt", "a", "--prompt", "b", "--stream")
    assert bad.returncode == 2 and "one prompt" in bad.stderr

"""The OpenAI-compatible HTTP API and /metrics of a node (hexswarm/api/http_api.py, metrics.py):
a 3-node local swarm on a tiny model, one node with `http` and `api_token` set; driven with the
`openai` client, curl and plain HTTP; outputs equal `generate` and `hexswarm submit`."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from hexswarm.launcher import LocalSwarm, free_port, wait_for
from swarmutil import reference, submit_many

openai = pytest.importorskip("openai")
prom_parser = pytest.importorskip("prometheus_client.parser")

PINNED = {"hetero_config": [2, 1], "pp_partition": [2, 2], "replicas": 1}
TOKEN = "s3cret-token"
NEW = 8
PROMPT = "Once upon a time"


class Api:
    def __init__(self, base: str, model: str, node):
        self.base, self.model, self.node = base, model, node

    def request(self, method: str, path: str, body=None, token: str | None = TOKEN, raw: bytes | None = None):
        """(status, headers, body bytes) of one plain HTTP request."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def client(self, token: str = TOKEN):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=token, max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        """sample name + sorted labels -> value, parsed by prometheus_client."""
        status, headers, body = self.request("GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain"), (status, body[:200])
        out = {}
        for family in prom_parser.text_string_to_metric_families(body.decode()):
            for s in family.samples:
                out[s.name + json.dumps(dict(sorted(s.labels.items())))] = s.value
        return out


@pytest.fixture(scope="module")
def http_swarm(tiny_model, tmp_path_factory):
    """One swarm, two HTTP entries: node 2 serves HTTP in its own process, node 1 from 2 worker processes."""
    sw = LocalSwarm(tmp_path_factory.mktemp("http_swarm"), tiny_model, [2, 1, 1], serve_layout=PINNED,
                    extra={"dispatch_wait_s": 5.0})
    entries = {}
    for index, workers in ((2, 0), (1, 2)):
        entry = sw.nodes[index]
        port = free_port()
        cfg = yaml.safe_load(entry.config.read_text())
        entry.config.write_text(yaml.safe_dump({**cfg, "http": f"127.0.0.1:{port}", "api_token": TOKEN,
                                                "http_workers": workers}))
        entries[workers] = Api(f"http://127.0.0.1:{port}", Path(tiny_model).name, entry)
    sw.start()
    try:
        sw.wait_layout(90)
        for a in entries.values():
            assert wait_for(lambda: "HTTP API listening on" in a.node.log(), 30, 0.2), a.node.log()[-3000:]
            a.swarm = sw
        yield entries
    finally:
        sw.stop()


@pytest.fixture(scope="module", params=[0, 2], ids=["in-process", "2-workers"])
def api(http_swarm, request):
    """The HTTP API of an entry that serves it in its own process (0) or from 2 worker processes."""
    return http_swarm[request.param]


def _error(body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def test_models_lists_the_checkpoint(api):
    status, _, body = api.request("GET", "/v1/models")
    assert status == 200
    (card,) = json.loads(body)["data"]
    assert card["id"] == api.model and card["object"] == "model"
    assert [m.id for m in api.client().models.list().data] == [api.model]


def test_openai_stream_yields_the_tokens_of_submit_and_generate(api, tiny_model):
    stream = api.client().completions.create(model=api.model, prompt=PROMPT, max_tokens=NEW, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"return_token_ids": True})
    text, ids, finish, usage = "", [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
            ids += (choice.model_extra or {}).get("token_ids") or []
            finish = choice.finish_reason or finish
    (submitted,) = submit_many([(api.node.addr, {"prompt": PROMPT, "max_new_tokens": NEW})])
    ref = reference(tiny_model, PROMPT, NEW)
    assert ids == submitted["done"]["tokens"] == ref["tokens"]
    assert text == submitted["done"]["text"] == ref["text"]
    assert finish == ("length" if len(ref["tokens"]) == NEW else "stop")
    assert usage.completion_tokens == len(ref["tokens"]) and usage.prompt_tokens == len(ref["prompt_tokens"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_ignore_eos_generates_exactly_max_tokens(api, tiny_model):
    # greedy, this prompt ends at EOS long before 24 tokens on the tiny model (asserted: else the test proves nothing)
    ref = reference(tiny_model, "Hello", 24)
    assert ref["finish_reason"] == "eos" and len(ref["tokens"]) < 24, ref
    plain = api.client().completions.create(model=api.model, prompt="Hello", max_tokens=24, temperature=0,
                                            extra_body={"return_token_ids": True})
    assert plain.choices[0].model_extra["token_ids"] == ref["tokens"] and plain.choices[0].finish_reason == "stop"
    c = api.client().completions.create(model=api.model, prompt="Hello", max_tokens=24, temperature=0,
                                        extra_body={"return_token_ids": True, "ignore_eos": True})
    ids = c.choices[0].model_extra["token_ids"]
    assert len(ids) == 24 == c.usage.completion_tokens and ids[:len(ref["tokens"])] == ref["tokens"]
    assert c.choices[0].finish_reason == "length"
    (submitted,) = submit_many([(api.node.addr, {"prompt": "Hello", "max_new_tokens": 24, "ignore_eos": True})])
    assert submitted["done"]["tokens"] == ids and submitted["done"]["finish_reason"] == "length"
    from conftest import run_cli

    p = run_cli("submit", "--peer", api.node.addr, "--prompt", "Hello", "--max-new-tokens", "24", "--ignore-eos",
                "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["tokens"] == ids, p.stderr


def test_completion_without_stream_and_with_a_stop_string(api, tiny_model):
    ref = reference(tiny_model, "The quick brown fox", 12)
    c = api.client().completions.create(model=api.model, prompt="The quick brown fox", max_tokens=12, temperature=0)
    assert c.choices[0].text == ref["text"] and c.object == "text_completion"
    assert c.usage.completion_tokens == len(ref["tokens"])
    # a stop string taken from the middle of the answer: the answer ends before it, streamed or not
    visible = ref["text"]
    stop = next((visible[i:i + 2] for i in range(3, len(visible) - 2) if visible[i:i + 2].strip()), None)
    if stop is None:
        pytest.skip(f"the tiny model's answer {visible!r} has no stop-string candidate")
    expected = visible[:visible.find(stop)]
    c = api.client().completions.create(model=api.model, prompt="The quick brown fox", max_tokens=12, temperature=0,
                                        stop=[stop, "never-seen-zzz"])
    assert c.choices[0].text == expected and c.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in api.client().completions.create(
        model=api.model, prompt="The quick brown fox", max_tokens=12, temperature=0, stop=stop, stream=True)
        if ch.choices)
    assert streamed == expected


def test_sampling_with_seed_matches_generate(api, tiny_model):
    from hexswarm.runtime.sampling import SamplingParams

    c = api.client().completions.create(model=api.model, prompt=PROMPT, max_tokens=NEW, temperature=0.8, top_p=0.9,
                                        seed=5, extra_body={"return_token_ids": True})
    ref = reference(tiny_model, PROMPT, NEW, SamplingParams(0.8, 0, 0.9, 5))
    assert c.choices[0].model_extra["token_ids"] == ref["tokens"]


def test_chat_completions_use_the_chat_template(api, tiny_model):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello, world!"}]
    # the tiny checkpoint's template, rendered by hand; its leading <s> is the BOS the tokenizer adds anyway
    rendered = "system: be brief\n<s>user: Hello, world!\nassistant:"
    ref = reference(tiny_model, rendered, NEW)
    client = api.client()
    c = client.chat.completions.create(model=api.model, messages=messages, max_tokens=NEW, temperature=0)
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == ref["text"]
    assert c.usage.prompt_tokens == len(ref["prompt_tokens"]) and c.usage.completion_tokens == len(ref["tokens"])
    chunks = list(client.chat.completions.create(model=api.model, messages=messages, max_tokens=NEW, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref["text"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # content as a list of text parts
    parts = [{"role": "system", "content": "be brief"},
             {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world!"}]}]
    c2 = client.chat.completions.create(model=api.model, messages=parts, max_tokens=NEW, temperature=0)
    assert c2.choices[0].message.content == ref["text"]


def test_curl_streams_server_sent_events(api, tiny_model):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": api.model, "prompt": PROMPT, "max_tokens": NEW, "temperature": 0, "stream": True})
    p = subprocess.run([curl, "-sS", "-N", "--max-time", "60", "-H", f"Authorization: Bearer {TOKEN}",
                        "-H", "Content-Type: application/json", "-d", body, "-D", "-", f"{api.base}/v1/completions"],
                       capture_output=True, timeout=90)
    assert p.returncode == 0, p.stderr
    head, _, events = p.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "text/event-stream" in head.lower(), head
    datas = [line[len("data: "):] for line in events.split("\n\n") if line.startswith("data: ")]
    assert datas[-1] == "[DONE]" and len(datas) >= 3, events
    chunks = [json.loads(d) for d in datas[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference(tiny_model, PROMPT, NEW)["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_wrong_token_gets_401(api, token):
    for method, path, body in (("GET", "/v1/models", None), ("GET", "/metrics", None),
                               ("POST", "/v1/completions", {"model": api.model, "prompt": "hi"})):
        status, headers, raw = api.request(method, path, body, token=token)
        assert status == 401, (path, raw)
        err = _error(raw)
        assert err["code"] == ("missing_api_key" if token is None else "invalid_api_key")
        assert err["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        api.client(token or "x").completions.create(model=api.model, prompt="hi", max_tokens=2)
    assert api.request("GET", "/health", token=token)[0] == 200  # liveness needs no token


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "hi"}, "model"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "n": 2}, "n"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "stop": [1, 2]}, "stop"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "seed": "x"}, "seed"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "top_k": 2**64}, "top_k"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "ignore_eos": 1}, "ignore_eos"),
    ("/v1/completions", {"model": "M", "prompt": ""}, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": [1, 2, 3]}, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": "word " * 600, "max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"model": "M"}, "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
])
def test_malformed_body_gets_400_naming_the_field(api, path, body, param):
    if body.get("model") == "M":
        body = {**body, "model": api.model}
    status, _, raw = api.request("POST", path, body)
    assert status == 400, raw
    err = _error(raw)
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert param.split("[")[0].split(".")[0] in err["message"], err


def test_bad_json_wrong_model_route_and_method(api):
    status, _, raw = api.request("POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and _error(raw)["code"] == "invalid_json"
    # red-team finding 7 (issue 13): these were 500s
    status, _, raw = api.request("POST", "/v1/completions", raw=b"[" * 100000 + b"]" * 100000)
    assert status == 400 and _error(raw)["code"] == "invalid_json"
    status, _, raw = api.request("POST", "/v1/completions",
                                 raw=b'{"model": "' + api.model.encode() + b'", "prompt": "a \\ud800 b"}')
    assert status == 400 and _error(raw)["code"] == "invalid_json", raw
    status, _, raw = api.request("POST", "/v1/completions", raw=b"[1, 2]")
    assert status == 400 and _error(raw)["code"] == "invalid_json"
    status, _, raw = api.request("POST", "/v1/completions", {"model": "gpt-4", "prompt": "hi"})
    assert status == 404 and _error(raw)["code"] == "model_not_found" and _error(raw)["param"] == "model"
    assert api.request("GET", "/v1/nothing")[0] == 404
    status, headers, raw = api.request("GET", "/v1/completions")
    assert status == 405 and _error(raw)["code"] == "method_not_allowed"


def test_metrics_parse_and_counters_move(api):
    ok = 'hexswarm_requests_total{"api": "completions", "outcome": "ok"}'
    p2p = 'hexswarm_requests_total{"api": "p2p", "outcome": "ok"}'
    before = api.metrics()
    api.client().completions.create(model=api.model, prompt="Hello, world!", max_tokens=NEW, temperature=0)
    (res,) = submit_many([(api.node.addr, {"prompt": "Hello, world!", "max_new_tokens": NEW})])
    assert "done" in res, res
    bad = api.request("POST", "/v1/completions", {"model": api.model, "prompt": "hi", "n": 3})
    assert bad[0] == 400
    after = api.metrics()
    assert after[ok] == before.get(ok, 0) + 1
    assert after[p2p] == before.get(p2p, 0) + 1
    tokens = "hexswarm_generated_tokens_total{}"
    assert after[tokens] >= before.get(tokens, 0) + 2
    ttft = "hexswarm_time_to_first_token_seconds_count{}"
    assert after[ttft] == before.get(ttft, 0) + 2
    itl = "hexswarm_inter_token_latency_seconds_count{}"
    assert after[itl] > before.get(itl, 0)
    for stage in ("0", "1"):
        key = 'hexswarm_stage_compute_seconds_count{"stage": "%s"}' % stage
        assert after[key] >= before.get(key, 0) + 2
        assert after['hexswarm_stage_compute_seconds_sum{"stage": "%s"}' % stage] > 0
    assert after['hexswarm_http_responses_total{"route": "/v1/completions", "status": "400"}'] >= 1
    assert after["hexswarm_peers_up{}"] == 3
    assert after["hexswarm_layout_epoch{}"] >= 1
    assert after["hexswarm_queue_depth{}"] >= 0 and after["hexswarm_entry_in_flight{}"] == 0
    # the node froze its loaded heap (freeze_heap, on by default) and counts its collector's passes
    assert after["hexswarm_gc_frozen_objects{}"] > 10_000
    young = 'hexswarm_gc_passes{"generation": "0"}'
    assert after[young] >= before[young] > 0 and after["hexswarm_gc_longest_pause_seconds{}"] > 0
    # the node's event loop worked on these requests (runtime/loop_watch.py)
    busy = "hexswarm_event_loop_busy_seconds{}"
    assert after[busy] > before[busy] > 0 and after["hexswarm_event_loop_longest_batch_seconds{}"] > 0
    # per-hop network time arrives from the request's trace spans, fetched in the background
    hop = 'hexswarm_hop_network_seconds_count{"stage": "1"}'
    assert wait_for(lambda: api.metrics().get(hop, 0) >= 1, 20, 0.3), api.request("GET", "/metrics")[2].decode()


# --- units: no swarm ---------------------------------------------------------------------------------------


def test_swarm_errors_map_to_http_statuses():
    from hexswarm.api.http_api import swarm_error

    busy = swarm_error({"code": "busy", "message": "busy: every pipeline has 32 requests queued; retry after 3 s"})
    assert busy.status == 429 and (b"retry-after", b"3") in busy.headers and "busy" in busy.message
    none = swarm_error({"code": "no_layout", "message": "no committed layout after 5 s; retry later"})
    assert none.status == 503 and none.body()["error"]["code"] == "no_layout"
    long_prompt = swarm_error({"code": "bad_request", "message": "the prompt has 900 tokens"})
    assert long_prompt.status == 400 and long_prompt.body()["error"]["param"] == "prompt"
    assert swarm_error({"code": "weird", "message": "?"}).status == 500


def test_text_stream_holds_back_stop_string_prefixes():
    from hexswarm.api.http_api import TextStream

    ts = TextStream(["STOP"])
    out = [ts.push(c) for c in "abSTxSTOPyz"]
    assert "".join(out) == "abSTx" and out[2] == "" and out[4] == "STx"
    assert ts.finish("abSTx") == ""
    ts = TextStream(["zz"])
    sent = "".join(ts.push(c) for c in "abz")
    assert sent == "ab" and ts.finish("abz") == "z"
    # deltas of several characters; a stop string across two deltas; held-back text ("" deltas)
    ts = TextStream(["<end>", "##"])
    out = [ts.push(d) for d in ["hello <", "", "en", "d> more"]]
    assert out == ["hello ", "", "", ""] and ts.finish("hello ") == ""
    ts = TextStream([])
    assert [ts.push(d) for d in ["a\ufffdb", "c"]] == ["a\ufffdb", "c"] and ts.finish("a\ufffdbcd") == "d"


def test_tokens_queued_together_go_out_in_one_chunk_and_each_index_once():
    """When the event loop falls behind, a relay takes every token already queued for its request in one
    go (SubmitService._take_tokens) and HTTP writes them as one chunk: one write per batch, not per token."""
    import trio

    from hexswarm.api.http_api import Responder
    from hexswarm.serve.submit import SubmitService

    class Text:
        def push(self, t):
            return f"<{t}>"

    def ev(i, attempt=1, sender="s0"):
        return {"kind": "event", "index": i, "token": 100 + i, "attempt": attempt, "_sender": sender}

    async def main():
        send, receive = trio.open_memory_channel(16)
        for m in [ev(1), ev(1), ev(2), ev(3, sender="intruder"), ev(4)]:
            send.send_nowait(m)
        tokens = []
        frames, held = SubmitService._take_tokens(ev(0), receive, tokens, True, Text(), "s0")
        assert tokens == [100, 101, 102] and [f["index"] for f in frames] == [0, 1, 2]
        assert held["_sender"] == "intruder"  # left to the relay's checks, not taken into the batch
        frames2, held2 = SubmitService._take_tokens(ev(3), receive, tokens, False, None, "s0")
        assert frames2 == [] and held2 is None and tokens == [100, 101, 102, 103, 104]  # not streamed: no frames
        send.send_nowait(ev(6))
        frames3, _ = SubmitService._take_tokens(ev(5), receive, tokens, True, None, "s0")
        assert frames3 == [{"token": 105, "index": 5}, {"token": 106, "index": 6}]  # timed only: no text

        sent = []

        async def asgi_send(msg):
            sent.append(msg)

        opts = {"stream": True, "stop": [], "return_token_ids": True, "include_usage": False}
        r = Responder(None, asgi_send, "rid", "m", False, opts)
        await r.on_frame({"batch": frames})
        assert len(sent) == 1
        chunk = json.loads(sent[0]["body"].decode().removeprefix("data: "))
        assert chunk["choices"][0]["token_ids"] == [100, 101, 102] and chunk["choices"][0]["text"] == "<100><101><102>"

    trio.run(main)


@pytest.mark.parametrize("chat", [False, True])
def test_token_chunks_formatted_once_equal_the_whole_chunk_dumped(chat):
    """The token chunk's fast path writes the same characters json.dumps gives for the full chunk."""
    from hexswarm.api.http_api import Responder

    opts = {"stream": True, "stop": [], "return_token_ids": True, "include_usage": False}
    r = Responder(None, None, 'r"1\u00e9', 'model "x"', chat, opts)
    for delta, ids in [("", []), ("Hi \"there\"\n", [1, 22]), ("\u00e9\u4e2d\U0001f600", None), ("", None)]:
        want = f"data: {json.dumps(r._chunk(delta, token_ids=ids))}\n\n".encode()
        assert r._token_event(delta, ids) == want


def test_node_metrics_render_what_prometheus_client_parses():
    """Counters, histograms and the gauges read at scrape time (one failing callback costs only its own gauge)."""
    from types import SimpleNamespace

    from hexswarm.api.metrics import CallbackGauges, EntryMetrics

    m = EntryMetrics(SimpleNamespace(table=SimpleNamespace(up=lambda: [1, 2])))
    m.requests.labels(api="p2p", outcome='o"k').inc()
    for v in (0.0005, 0.003, 20.0):
        m.itl.observe(v)
    broken = CallbackGauges()
    broken.add("t_broken", "raises", callback=lambda: 1 / 0)
    broken.add("t_fine", "by label", ("k",), callback=lambda: {("b",): 2.0, ("a",): 1.5})
    m.registry.register(broken)
    fams = {f.name: f for f in prom_parser.text_string_to_metric_families(m.render())}
    assert fams["hexswarm_requests"].samples[0].labels == {"api": "p2p", "outcome": 'o"k'}
    assert fams["hexswarm_requests"].samples[0].value == 1
    buckets = {s.labels["le"]: s.value for s in fams["hexswarm_inter_token_latency_seconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets["0.001"] == 1 and buckets["0.005"] == 2 and buckets["10.0"] == 2 and buckets["+Inf"] == 3
    assert fams["hexswarm_peers_up"].samples[0].value == 2
    assert [(s.labels, s.value) for s in fams["t_fine"].samples] == [({"k": "a"}, 1.5), ({"k": "b"}, 2.0)]
    assert fams["t_broken"].samples == []
    assert not any(s.name.endswith("_created") for f in fams.values() for s in f.samples)


def test_config_http_keys_and_cli_override(tmp_path):
    from hexswarm.cli.node_cmd import _load
    from hexswarm.errors import UserError

    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"http": "127.0.0.1:8000", "api_token": "abc"}))
    assert _load(path).http == "127.0.0.1:8000" and _load(path).api_token == "abc"
    assert _load(path, http="0.0.0.0:9000").http == "0.0.0.0:9000"
    path.write_text(yaml.safe_dump({"http": "8000"}))
    with pytest.raises(UserError, match="key 'http'"):
        _load(path)
    path.write_text(yaml.safe_dump({"http": "127.0.0.1:8000", "http_workers": 2}))
    assert _load(path).http_workers == 2
    path.write_text(yaml.safe_dump({"http": "127.0.0.1:8000", "http_workers": "auto"}))
    assert _load(path).http_workers is None
    path.write_text(yaml.safe_dump({"http": "127.0.0.1:8000"}))
    assert _load(path).http_workers is None  # auto by default
    from types import SimpleNamespace

    from hexswarm.api.http_api import AUTO_HTTP_WORKERS, http_workers

    on = {dev: SimpleNamespace(settings=SimpleNamespace(device=dev)) for dev in ("cuda", "cpu")}
    assert http_workers(None, on["cuda"]) == AUTO_HTTP_WORKERS > 0
    assert http_workers(None, on["cpu"]) == http_workers(None, None) == 0
    assert http_workers(3, on["cpu"]) == 3 and http_workers(0, on["cuda"]) == 0
    for bad in (-1, "two", True):
        path.write_text(yaml.safe_dump({"http": "127.0.0.1:8000", "http_workers": bad}))
        with pytest.raises(UserError, match="key 'http_workers'"):
            _load(path)


def test_client_that_goes_away_cancels_its_request(api):
    import httpx

    cancelled = 'hexswarm_requests_total{"api": "completions", "outcome": "cancelled"}'
    before = api.metrics().get(cancelled, 0)
    body = {"model": api.model, "prompt": PROMPT, "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.stream("POST", api.base + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                break  # one chunk is enough: hang up
    assert wait_for(lambda: api.metrics().get(cancelled, 0) == before + 1, 30, 0.2)
    m = api.metrics()
    assert m["hexswarm_entry_in_flight{}"] == 0
    # the pipeline stops computing the abandoned request
    st = lambda: api.swarm.status(api.swarm.nodes[0])["stages"]  # noqa: E731
    assert wait_for(lambda: all(s["in_flight"] == 0 for s in st()), 30, 0.3), st()
    import trio

    from hexswarm.net.client import ask
    from hexswarm.net.protocols import TRACE

    spans = trio.run(ask, api.node.addr, TRACE, {"rid": rid})["spans"]
    assert spans and all(s["steps"] < 400 for s in spans), spans  # stopped long before its ~500 tokens


def test_cli_submit_without_stream_keeps_stdout_clean_and_peers_png(http_swarm, tiny_model, tmp_path):
    api = http_swarm[0]  # no HTTP here: one entry is enough
    from conftest import run_cli

    p = run_cli("submit", "--peer", api.node.addr, "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["tokens"] == reference(tiny_model, PROMPT, NEW)["tokens"]  # stdout: the JSON only
    png = tmp_path / "peers.png"
    q = run_cli("peers", "--peer", api.node.addr, "--png", str(png))
    assert q.returncode == 0, q.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(n.peer_id in q.stderr for n in api.swarm.nodes) == 3  # the picture's legend names every peer


def test_peers_picture_draws_every_peer_and_link(tmp_path):
    from matplotlib.image import imread

    from hexswarm.api.peers_render import links, render_peers_png

    cpu = {"kind": "cpu", "name": "cpu", "memory_gib": 4}
    gpu = {"kind": "cuda", "name": "H100", "memory_gib": 80}
    reply = {"self": "A", "swarm": "s", "peers": [
        {"peer_id": "A", "state": "up", "devices": [gpu, gpu], "links": {"B": {"rtt_ms": 1.5, "mbps": 9000}},
         "calibration": {"decode": [[1, 0.0057], [32, 0.007]], "context": 128, "prefill_tokens_per_s": 2e4, "prompt": 128}},
        {"peer_id": "B", "state": "up", "devices": [cpu], "links": {"A": {"rtt_ms": 1.4, "mbps": None},
                                                                   "C": {"rtt_ms": 30, "mbps": 100}}},
        {"peer_id": "C", "state": "down", "devices": [], "links": {}},
    ]}
    assert links(reply["peers"]) == [(0, 1, 1.4, 9000), (1, 2, 30, 100)]
    path = tmp_path / "p.png"
    render_peers_png(reply, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)[:, :, :3]
    pixels = {tuple(int(round(c * 255)) for c in px) for px in img.reshape(-1, 3)}
    # up (green) and down (red) frames, and the two device colours (tab10's first two: cpu, H100)
    assert {(44, 160, 44), (214, 39, 40), (31, 119, 180), (255, 127, 14)} <= pixels


def _http_workers(node) -> list[int]:
    """pids of the node's HTTP worker processes."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(stat[1]) == node.proc.pid and b"hexswarm.api.http_worker" in cmdline:
            pids.append(int(proc.name))
    return sorted(pids)


def test_killed_http_worker_is_restarted(http_swarm):
    import os
    import signal

    api = http_swarm[2]
    before = _http_workers(api.node)
    assert len(before) == 2, before
    sent = api.node.log()
    os.kill(before[0], signal.SIGKILL)
    assert wait_for(lambda: len(set(_http_workers(api.node)) - set(before)) == 1 and len(_http_workers(api.node)) == 2,
                    60, 0.2), api.node.log()[len(sent):]
    restarted = api.node.log()[len(sent):]
    assert restarted.count(f"(pid {before[0]}) exited") == 1, restarted
    for _ in range(4):  # whichever worker takes the connection
        c = api.client().completions.create(model=api.model, prompt=PROMPT, max_tokens=2, temperature=0)
        assert c.choices[0].finish_reason in ("stop", "length")
    assert api.node.alive()


def test_http_workers_import_no_torch():
    import subprocess
    import sys

    code = ("import sys, hypercorn.trio, hexswarm.api.http_worker, hexswarm.api.http_api, hexswarm.runtime.chat; "
            "print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "False", p.stderr


def test_http_worker_channel_batches_a_steps_frames_and_cancels():
    """The node <-> worker channel without processes: the frames a request's serve emits between two of the
    node's checkpoints reach the worker in one channel frame, and its Responder gets the tokens as one batch;
    a request cancelled in the worker is cancelled on the node; metrics and counters cross the channel."""
    import socket

    import trio

    from hexswarm.api.http_worker import Channel, RemoteBackend, WorkerLink

    class Backend:  # what the node's LocalBackend does, without a swarm
        def __init__(self):
            self.cancelled, self.counts = [], []

        def info(self):
            return {"created": 7, "model_name": "m", "model_id": "f" * 16, "max_seq_len": 64,
                    "chat": ["{{ messages[0].content }}", "<s>", "</s>"], "strip_bos": True}

        async def serve(self, msg, emit, kind, put):
            if msg["prompt"] == "hang":
                await trio.sleep_forever()
            await emit({"accepted": {"request_id": msg["request_id"]}})
            for i in range(4):  # one engine step's tokens, as the relay hands them on: no checkpoint between them
                put({"token": 100 + i, "index": i, "text": str(i)})
            await emit({"token": 104, "index": 4, "text": "4"})
            return {"done": {"tokens": list(range(100, 105)), "kind": kind}}

        def cancel(self, rid):
            self.cancelled.append(rid)

        async def metrics_text(self):
            return "m 1\n"

        def count_http(self, route, status):
            self.counts.append((route, status))

    async def main():
        node_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        backend = Backend()
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as node_nursery:
                outer.start_soon(WorkerLink(backend, "tok", Channel(node_end), node_nursery).run)
                channel = Channel(worker_end)
                remote = RemoteBackend(channel)
                outer.start_soon(channel.write_loop)
                outer.start_soon(channel.read_loop, remote.deliver)
                assert await remote.start() == "tok"
                assert (remote.model_name, remote.max_seq_len, remote.strip_bos) == ("m", 64, True)
                assert remote.chat.render([{"role": "user", "content": "hi"}]) == "hi" and remote.chat.bos == "<s>"
                got = []

                async def emit(frame):
                    got.append(frame)

                final = await remote.serve({"request_id": "r1", "prompt": "p"}, emit, "chat")
                assert final == {"done": {"tokens": [100, 101, 102, 103, 104], "kind": "chat"}}
                assert got[0] == {"accepted": {"request_id": "r1"}} and len(got) == 2, got
                assert [f["token"] for f in got[1]["batch"]] == [100, 101, 102, 103, 104]
                with trio.move_on_after(0.2):
                    await remote.serve({"request_id": "r2", "prompt": "hang"}, emit, "completions")
                with trio.fail_after(5):
                    while not backend.cancelled:
                        await trio.sleep(0.01)
                assert backend.cancelled == ["r2"] and not remote.requests
                remote.count_http("/v1/models", 200)
                await remote.metrics_text()
                assert backend.counts == [("/v1/models", 200)]
                node_nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()

    trio.run(main)


def test_garbage_http_gets_errors_not_tracebacks(api):
    import socket

    start = len(api.node.log())
    port = int(api.base.rsplit(":", 1)[1])
    for raw in (b"\x00\xff garbage\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n{"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            # whole requests: a body cut short by the client's close can make hypercorn 0.18 log a
            # BusyResourceError (its error response racing ours; in-process as well)
            s.sendall(raw)
            assert s.recv(4096).startswith(b"HTTP/1.1 4")
    status, _, raw = api.request("POST", "/v1/completions", raw=b'{"model": 1')
    assert status == 400 and _error(raw)["code"] == "invalid_json"
    assert api.request("GET", "/health")[0] == 200
    assert "Traceback" not in api.node.log()[start:], api.node.log()[start:]

#!/usr/bin/env python
"""Serving against the engine it runs on, in one run, on one device.

1. The engine (bench_gpu's functions): ms per decode step at batch 1, 8, 32, 64 (and at every
   concurrency level asked for), and prefill of one prompt of --prompt-tokens tokens.
2. A local swarm (LocalSwarm: node processes on 127.0.0.1, every stage on the same device, pinned layout
   hetero_config [1]*n, layers split evenly) with 1, 2 and 4 stages.
3. Load on it from several client processes (started and connected before the clock runs), through the
   OpenAI HTTP API (streamed SSE with token ids: one event per token) and through `/hexswarm/submit/1`
   (SwarmClient, streamed frames), at concurrency 1, 8, 32, 64; prompts of exactly --prompt-tokens tokens,
   exactly --new-tokens new tokens each (requests ask `ignore_eos`, as vLLM's benchmarks do: a random model
   emits EOS early, which made a level time first tokens, not decoding; tokens are counted as they come).

4. Before the levels, per swarm and streamed front end, an entry probe: TTFTs of tiny requests (a 2-token
   prompt, 1 new token) one at a time and in one burst of the highest concurrency, i.e. what the entry,
   dispatch and token relay add to a request (``--no-entry-probe`` skips it); tools/plan_vs_measured.py
   reads it as its entry quantities.

Reported per (stages, front end, concurrency): tokens/s, TTFT p50/p99, inter-token latency p50/p99, and
their ratios to the engine measured in the same run: tokens/s over the engine's batch-c tokens/s, ITL over
the engine's batch-1 ms/token, TTFT over the engine's prefill time.

    python tools/bench_serve.py --device cuda --json serve.json                # 7B-shaped, 32 layers, full grid
    python tools/bench_serve.py --device cuda --model-dir /dev/shm/llama7b     # reuse a checkpoint
    python tools/bench_serve.py --tiny --device cpu                            # the code path on CPU
    python tools/bench_serve.py --cpu-target                                   # tiny, HTTP, 1 node: 32 vs 1

`--model-dir DIR` that does not exist yet: the checkpoint is made there and kept for the next run.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
for p in (str(REPO), str(TOOLS)):  # spawned load generators import this module by name
    if p not in sys.path:
        sys.path.insert(0, p)

from hexswarm.plan.workload import staggered_starts, think_times  # noqa: E402

PREFILL_BATCH_TOKENS = 2048  # the engine's batched prefill rate is measured at this many tokens in one forward
CPU_TARGET = 12.0  # the CPU goal: tokens/s at 32 concurrent >= 12x tokens/s at 1
PROBE_PROMPT_TOKENS = 2  # the entry probe's prompts: next to no GPU work, so their TTFT is mostly the entry's
PROBE_ALONE = 8  # probe requests one at a time
PROBE_STREAM_TOKENS = 64  # new tokens of each streaming probe request (the entry's work per token relayed)


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--tiny", action="store_true", help="a tiny random model (CPU smoke runs)")
    ap.add_argument("--tiny-shape", default="4,128", help="LAYERS,HIDDEN of the tiny model (the issue's CPU "
                    "measurement used 2,64)")
    ap.add_argument("--layers", type=int, default=32, help="layers of the random 7B-shaped checkpoint")
    ap.add_argument("--model-dir", help="a checkpoint to use (made there if missing, and kept)")
    ap.add_argument("--stages", default="1,2,4")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--frontends", default="http,submit")
    ap.add_argument("--engine-batches", default="1,8,32,64")
    ap.add_argument("--requests-per-level", type=int, default=0,
                    help="requests at each concurrency level (default: 2 x concurrency, at least 4)")
    ap.add_argument("--waves", type=int, default=0,
                    help="requests at each level = waves x concurrency (at least 4), unless --requests-per-level")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens each request generates (default 128; "
                    "64 with --cpu-target)")
    ap.add_argument("--client-procs", type=int, default=4, help="load generator processes (at most one per request in flight)")
    ap.add_argument("--node-extra", action="append", default=None,
                    help="node config keys added to every node, as YAML or JSON ('http_workers: 2', "
                         "'{micro_batches: 1, gather_prompts: false}'); given several times, "
                         "each is a variant: its own swarm per stage count, after one engine measurement")
    ap.add_argument("--engine-steps", type=int, default=0, help="decode steps per engine measurement (default 32 on cuda, 8 on cpu)")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--profile", help="STAGES:FRONTEND:CONCURRENCY: sample every node process with py-spy during "
                    "that level (needs py-spy on PATH)")
    ap.add_argument("--profile-dir", default=".", help="where the py-spy profiles go")
    ap.add_argument("--no-entry-probe", dest="entry_probe", action="store_false",
                    help="skip the entry probe (per swarm and streamed front end: 2-token prompts, 1 new token, "
                    "8 alone and one burst of the highest concurrency; what tools/plan_vs_measured.py reads as the entry)")
    ap.add_argument("--arrival", default="burst",
                    help="how each level's clients send their first requests, one or both of: burst (all at once; "
                    "equal-length requests then come back together, wave after wave), staggered (client j of c "
                    "first sends at j/c of one request's expected time, prefill + new tokens x the engine's batch-c "
                    "step, so the closed loop keeps its requests spread as independent users do; and after each "
                    "answer a client waits up to one engine batch-c step, so its arrivals do not lock onto one "
                    "phase of the step cycle: hexswarm/plan/workload.py think_times)")
    ap.add_argument("--records", action="store_true",
                    help="keep every request's [start, first token, end, tokens] (s from the level's start) in the JSON")
    ap.add_argument("--cpu-target", action="store_true",
                    help="the issue's CPU target: tiny model, HTTP, one node, tokens/s at 32 concurrent over at 1")
    a = ap.parse_args(argv)
    if a.cpu_target:
        a.tiny, a.device, a.stages, a.frontends, a.concurrency = True, "cpu", "1", "http,http-whole", "1,32"
        a.engine_batches = "1"
        a.new_tokens = a.new_tokens or 64  # the CPU target's length since it was first measured
        a.requests_per_level = a.requests_per_level or 32
    a.new_tokens = a.new_tokens or 128
    try:
        import yaml

        a.variants = [yaml.safe_load(v) for v in a.node_extra or ["{}"]]
        assert all(isinstance(v, dict) for v in a.variants)
    except (yaml.YAMLError, AssertionError):
        ap.error("--node-extra must be a YAML mapping (JSON is YAML): 'http_workers: 2' or '{\"micro_batches\": 1}'")
    a.node_extra = a.variants[0]  # the variant being run (start_swarm reads it)
    a.arrivals = [x.strip() for x in a.arrival.split(",") if x.strip()]
    if not a.arrivals or set(a.arrivals) - {"burst", "staggered"}:
        ap.error("--arrival takes burst, staggered or both (burst,staggered)")
    return a


# ---- the model ---------------------------------------------------------------------------

def node_defaults() -> dict:
    """The node settings a variant runs with where its node_extra names none (tools/plan_vs_measured.py reads them)."""
    from hexswarm.swarm.config import NodeConfig

    return {"gather_prompts": NodeConfig.__dataclass_fields__["gather_prompts"].default}


def tiny_spec(shape: str = "4,128"):
    from hexswarm.model.tiny import TinySpec

    layers, hidden = _csv_ints(shape)
    return TinySpec(layers=layers, hidden=hidden, heads=4, kv_heads=2, intermediate=2 * hidden, max_positions=1024)


def prepare_model(args, work: Path, log) -> Path:
    """The checkpoint: --model-dir (made there if missing), the tiny model, or bench_gpu's 7B-shaped maker
    plus the tiny tokenizer (random ids past its vocabulary decode to nothing; tokens are counted by id)."""
    import torch

    from hexswarm.model.tiny import make_tiny_llama, write_tokenizer

    if args.model_dir and (Path(args.model_dir) / "config.json").is_file():
        return Path(args.model_dir)
    out = Path(args.model_dir) if args.model_dir else work / "model"
    if args.tiny:
        return make_tiny_llama(out, tiny_spec(args.tiny_shape))
    from bench_gpu import make_llama_checkpoint

    t = time.perf_counter()
    make_llama_checkpoint(out, args.layers, torch.device(args.device))
    write_tokenizer(out, 384)
    log(f"checkpoint: {args.layers} layers in {out} ({time.perf_counter() - t:.0f} s)")
    return out


def exact_prompt(tokenizer, n: int) -> str:
    """A text the tokenizer encodes to exactly n tokens (BOS included)."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "swarm", "peers"]
    text, i = "", 0
    while len(tokenizer.encode(text)) < n - 4:
        text += (" " if text else "") + words[i % len(words)]
        i += 1
    for _ in range(64):  # finish with single characters until the count is exact
        have = len(tokenizer.encode(text))
        if have == n:
            return text
        if have > n:
            text = text[:-1]
            continue
        for ch in " 0123456789.,;:!?":  # a character that adds exactly one token
            if len(tokenizer.encode(text + ch)) == have + 1:
                text += ch
                break
        else:
            text += "x"
    raise RuntimeError(f"could not build a prompt of exactly {n} tokens")


# ---- 1. the engine -----------------------------------------------------------------------

def measure_engine(args, model_dir: Path, batches: list[int], log) -> dict:
    import gc

    import torch

    from bench_gpu import Clock, copy_bandwidth, engine_decode_ms, engine_prefill_ms, load_engine

    from hexswarm.runtime.cpus import engine_torch_threads

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and (threads := engine_torch_threads("cpu")) is not None:  # as a node's engine runs
        torch.set_num_threads(threads)
    clock = Clock(device)
    cuda = device.type == "cuda"
    steps = args.engine_steps or (32 if cuda else 8)
    warmup, repeats = (3, 10) if cuda else (1, 3)
    out = {"copy_bw_GBps": round(copy_bandwidth(device, clock, (1 << 30) if cuda else (16 << 20)) / 1e9, 1)}
    model = load_engine(model_dir, device, dtype)
    mode = "graph" if cuda else "eager"
    out["prefill_ms"] = round(engine_prefill_ms(model, 1, args.prompt_tokens, clock, warmup, repeats, "fast"), 3)
    log(f"engine prefill of {args.prompt_tokens} tokens: {out['prefill_ms']} ms")
    # a serving ceiling needs the engine's best prefill rate too: every request's prompt is prefilled
    many = max(1, PREFILL_BATCH_TOKENS // args.prompt_tokens) if cuda else 4
    ms = engine_prefill_ms(model, many, args.prompt_tokens, clock, warmup, repeats, "fast")
    out["prefill_batch"] = {"prompts": many, "ms": round(ms, 3), "tokens_per_s": round(many * args.prompt_tokens * 1e3 / ms)}
    log(f"engine prefill of {many} x {args.prompt_tokens} tokens: {ms:.2f} ms ({out['prefill_batch']['tokens_per_s']} tokens/s)")
    rows = []
    for B in batches:
        ms = engine_decode_ms(model, B, args.prompt_tokens, steps, clock, warmup, repeats, mode)
        rows.append({"batch": B, "ms_per_step": round(ms, 3), "tokens_per_s": round(B * 1e3 / ms, 1)})
        log(f"engine decode batch {B}: {ms:.2f} ms/step, {rows[-1]['tokens_per_s']} tokens/s")
    out["engine"] = rows
    # the same decode over the contexts the served requests go through (prompt .. prompt + new tokens): the
    # short run above reads less KV per step than the requests' later steps do
    if args.new_tokens > steps:
        out["engine_full"] = []
        for B in batches:
            ms = engine_decode_ms(model, B, args.prompt_tokens, args.new_tokens, clock, 1, 3 if cuda else 1, mode)
            out["engine_full"].append({"batch": B, "ms_per_step": round(ms, 3), "tokens_per_s": round(B * 1e3 / ms, 1)})
            log(f"engine decode batch {B} over {args.new_tokens} steps: {ms:.2f} ms/step")
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


# ---- 2. the swarm ------------------------------------------------------------------------

def start_swarm(args, work: Path, model_dir: Path, stages: int, layers: int, max_concurrency: int):
    """LocalSwarm with `stages` nodes, each serving one stage on the same device; node 0 serves HTTP."""
    import yaml

    from hexswarm.net.ports import free_port
    from hexswarm.launcher import LocalSwarm

    split = [layers // stages + (1 if i < layers % stages else 0) for i in range(stages)]
    cuda = args.device == "cuda"
    extra = {"serve_device": args.device, "serve_dtype": "bfloat16" if cuda else "float32",
             "max_batch": max(8, max_concurrency), "max_seq_len": args.prompt_tokens + args.new_tokens + 8,
             "dispatch_wait_s": 120.0}
    if cuda:  # the planner's view of the device (a pinned layout only needs one device per TP-1 stage)
        extra["devices"] = [{"kind": "cuda", "name": "cuda0", "memory": 80, "tflops": 900, "mem_bw": 3000}]
    extra.update(args.node_extra)
    swarm = LocalSwarm(work / f"swarm{stages}-{len(list(work.glob('swarm*')))}", model_dir, [1] * stages,
                       serve_layout={"hetero_config": [1] * stages, "pp_partition": split, "replicas": 1},
                       extra=extra)
    entry = swarm.nodes[0]
    port = free_port()
    cfg = yaml.safe_load(entry.config.read_text())
    entry.config.write_text(yaml.safe_dump({**cfg, "http": f"127.0.0.1:{port}"}))
    swarm.start()
    try:
        swarm.wait_layout(600 if cuda else 180)
        from hexswarm.launcher import wait_for

        if not wait_for(lambda: "HTTP API listening on" in entry.log(), 60, 0.2):
            raise RuntimeError(f"the entry's HTTP API did not start:\n{entry.log()[-3000:]}")
    except BaseException:
        swarm.stop()
        raise
    return swarm, {"url": f"http://127.0.0.1:{port}", "addr": entry.addr, "model": model_dir.name}


# ---- 3. the load generator -----------------------------------------------------------------

def client_process(conn, frontend: str, target: dict) -> None:
    """One load generator process: keeps its connections across levels; per job: connect `concurrency`
    clients' worth (untimed), say ready, wait for go, run, send the per-request records."""
    import trio

    trio.run(_client_main, conn, frontend, target)


async def _client_main(conn, frontend: str, target: dict) -> None:
    import trio

    recv = lambda: trio.to_thread.run_sync(conn.recv)  # noqa: E731
    if frontend.startswith("http"):
        import httpx

        client = httpx.AsyncClient(base_url=target["url"], timeout=httpx.Timeout(600.0),
                                   limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))
        one = _http_request if frontend == "http" else _http_whole_request
    else:
        from hexswarm.api.client import SwarmClient

        client = SwarmClient([target["addr"]])
        one = _submit_request
    async with client:
        if frontend == "submit":
            await client.connect(target["addr"])
        while True:
            job = await recv()
            if job is None:
                return
            if frontend.startswith("http"):  # open (and keep alive) one connection per request in flight
                async with trio.open_nursery() as nursery:
                    for _ in range(job["concurrency"]):
                        nursery.start_soon(client.get, "/health")
            conn.send("ready")
            if await recv() != "go":
                return
            records: list[dict] = []
            todo = iter(range(job["requests"]))
            t_go = trio.current_time()

            async def client_loop(first_at: float, number: int) -> None:
                """One closed-loop client: its first request at `first_at` s after go, the next on each answer
                (after a think time of up to job["think_max_s"])."""
                await trio.sleep_until(t_go + first_at)
                thinks = think_times(number, job["think_max_s"])
                for n, i in enumerate(todo):
                    if n and job["think_max_s"] > 0:
                        await trio.sleep(next(thinks))
                    records.append(await one(client, target, job, i))

            async with trio.open_nursery() as nursery:
                for first_at, number in zip(job["starts"], job["numbers"]):
                    nursery.start_soon(client_loop, first_at, number)
            conn.send(records)


async def _http_request(client, target: dict, job: dict, i: int) -> dict:
    body = {"model": target["model"], "prompt": job["prompt"], "max_tokens": job["new_tokens"], "temperature": 0,
            "stream": True, "return_token_ids": True, "ignore_eos": True}
    t0 = time.monotonic()
    times: list[float] = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}", "start": t0, "end": time.monotonic()}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.monotonic()
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": str(chunk["error"])[:200], "start": t0, "end": now}
            for choice in chunk.get("choices") or []:
                times += [now] * len(choice.get("token_ids") or [])
    return {"start": t0, "times": times, "end": time.monotonic()}


async def _http_whole_request(client, target: dict, job: dict, i: int) -> dict:
    """Not streamed: one JSON answer per request (tokens counted, no TTFT or ITL)."""
    body = {"model": target["model"], "prompt": job["prompt"], "max_tokens": job["new_tokens"], "temperature": 0,
            "return_token_ids": True, "ignore_eos": True}
    t0 = time.monotonic()
    r = await client.post("/v1/completions", json=body)
    end = time.monotonic()
    if r.status_code != 200:
        return {"error": f"HTTP {r.status_code}: {r.text[:200]!r}", "start": t0, "end": end}
    ids = [t for c in r.json().get("choices") or [] for t in c.get("token_ids") or []]
    return {"start": t0, "times": [], "tokens": len(ids), "end": end}


async def _submit_request(client, target: dict, job: dict, i: int) -> dict:
    t0 = time.monotonic()
    times: list[float] = []

    def on_frame(frame: dict) -> None:
        if "token" in frame:
            times.append(time.monotonic())

    final = await client.submit({"prompt": job["prompt"], "max_new_tokens": job["new_tokens"], "stream": True,
                                 "ignore_eos": True},
                                on_frame=on_frame)
    if "error" in final:
        return {"error": str(final["error"])[:200], "start": t0, "end": time.monotonic()}
    # stage 0's own clock: from its start message to the first token (what the engine, not the path, took)
    return {"start": t0, "times": times, "end": time.monotonic(),
            "engine_ttft_s": ((final.get("done") or {}).get("timings") or {}).get("ttft_s")}


def deal(starts: list[float], counts: list[int]) -> list[list[float]]:
    """The clients' first-send times dealt round-robin over processes holding `counts` clients each, so
    every process gets early and late ones."""
    hands: list[list[float]] = [[] for _ in counts]
    k = 0
    for t in sorted(starts)[:sum(counts)]:
        while len(hands[k]) >= counts[k]:
            k = (k + 1) % len(counts)
        hands[k].append(t)
        k = (k + 1) % len(counts)
    return hands


class LoadGenerator:
    """`procs` client processes for one front end, started once (spawned: no CUDA state is inherited)."""

    def __init__(self, frontend: str, target: dict, procs: int):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client_process, args=(child, frontend, target), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def run(self, concurrency: int, requests: int, prompt: str, new_tokens: int,
            starts: list[float] | None = None, think_max_s: float = 0.0) -> tuple[list[dict], float]:
        """All records of one level and its wall time (first request sent to last token).  `starts`: when
        each of the `concurrency` clients sends its first request, in s after go (default all at once);
        `think_max_s`: each client waits up to that long (workload.think_times) after an answer."""
        starts = list(starts or [0.0] * concurrency)
        n = min(len(self.conns), concurrency)
        shares = [(concurrency // n + (i < concurrency % n), requests // n + (i < requests % n)) for i in range(n)]
        used = [(c, s) for c, s in zip(self.conns, shares) if s[0] > 0 and s[1] > 0]
        hands = deal(starts, [c for _, (c, _) in used])
        numbers = deal(list(range(concurrency)), [c for _, (c, _) in used])
        for (conn, (c, r)), first, mine in zip(used, hands, numbers):
            conn.send({"concurrency": c, "requests": r, "prompt": prompt, "new_tokens": new_tokens, "starts": first,
                       "numbers": mine, "think_max_s": think_max_s})
        for conn, _ in used:
            if conn.recv() != "ready":
                raise RuntimeError("a load generator failed to get ready")
        for conn, _ in used:
            conn.send("go")
        records = [rec for conn, _ in used for rec in conn.recv()]
        return records, max(r["end"] for r in records) - min(r["start"] for r in records)

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def cpu_seconds(pids: list[int], descendants: bool = True) -> float:
    """CPU time (user + system, all threads) used so far by these processes and (by default) their
    descendants, from /proc: on a machine whose cores the nodes share with the load generators, where
    the cores went."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    want = set(pids)
    changed = descendants
    while changed:  # close over descendants (an engine process, py-spy is not one: it is not our child)
        before = len(want)
        want |= {pid for pid, (ppid, _) in stats.items() if ppid in want}
        changed = len(want) != before
    return sum(stats[p][1] for p in want if p in stats)


class profiling:
    """py-spy on every node process while one level runs (`--profile STAGES:FRONTEND:C`): raw stacks,
    one file per node, in --profile-dir.  Where the time goes is read from these, not guessed."""

    def __init__(self, args, swarm, level: str):
        self.on = args.profile == level
        self.out = Path(args.profile_dir)
        self.swarm, self.level, self.procs = swarm, level.replace(":", "-"), []

    def __enter__(self):
        if self.on:
            import subprocess

            self.out.mkdir(parents=True, exist_ok=True)
            for i, node in enumerate(self.swarm.nodes):
                self.procs.append(subprocess.Popen(
                    ["py-spy", "record", "-r", "200", "-f", "raw", "--threads", "--subprocesses", "-o",
                     str(self.out / f"prof-{self.level}-node{i}.txt"), "-p", str(node.proc.pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)  # attached before the clock runs
        return self

    def __exit__(self, *exc):
        import signal

        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            p.wait(30)


LOOP_METRICS = {"hexswarm_event_loop_busy_seconds": "busy_s", "hexswarm_event_loop_slow_batches": "slow_batches",
                "hexswarm_event_loop_longest_batch_seconds": "longest_batch_s"}


def entry_loop(url: str) -> dict[str, float]:
    """The entry node's event-loop totals from its /metrics (hexswarm/runtime/loop_watch.py); {} where it has
    none (an older node, or /metrics did not answer)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in LOOP_METRICS:
            out[LOOP_METRICS[name]] = float(value)
    return out


def loop_delta(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict:
    """What the entry's event loop did between two entry_loop readings: busy seconds, the share of `wall_s` it
    was busy, the runs of tasks of 20 ms or more, the longest run so far."""
    if "busy_s" not in before or "busy_s" not in after:
        return {}
    busy = after["busy_s"] - before["busy_s"]
    return {"entry_loop_busy_s": round(busy, 3), "entry_loop_busy_share": round(busy / wall_s, 3) if wall_s else None,
            "entry_loop_slow_batches": int(after.get("slow_batches", 0) - before.get("slow_batches", 0)),
            "entry_loop_longest_batch_s": round(after.get("longest_batch_s", 0.0), 4)}


def entry_probe(gen: "LoadGenerator", prompt: str, burst: int, entry_pid: int, url: str | None = None) -> dict:
    """What the serving system adds to a request besides the model: TTFTs of tiny requests (a 2-token
    prompt, 1 new token), PROBE_ALONE one at a time (the entry's latency) and a burst of `burst` at once
    (how the entry spreads a wave); then a burst of `burst` streaming requests of PROBE_STREAM_TOKENS
    tokens with the entry node's own CPU seconds over it (its engine processes and HTTP workers not
    counted: what its event loop does per token relayed) and, from `url`'s /metrics, its event loop's busy
    seconds (the wall time that work holds the loop, waits for the GIL and for cores included).
    tools/plan_vs_measured.py turns them into its entry quantities."""
    def ttfts(records: list[dict]) -> list[float]:
        return sorted(round(r["times"][0] - r["start"], 5) for r in records if "error" not in r and r.get("times"))

    alone, _ = gen.run(1, PROBE_ALONE, prompt, 1)
    wave, _ = gen.run(burst, burst, prompt, 1)
    read_loop = lambda: entry_loop(url) if url else {}  # noqa: E731
    cpu0, loop0 = cpu_seconds([entry_pid], descendants=False), read_loop()
    streamed, wall = gen.run(burst, burst, prompt, PROBE_STREAM_TOKENS)
    cpu = cpu_seconds([entry_pid], descendants=False) - cpu0
    loop = loop_delta(loop0, read_loop(), wall)
    ok = [r for r in streamed if "error" not in r]
    stream = {"requests": len(ok), "tokens": sum(r.get("tokens", len(r.get("times", []))) for r in ok),
              "entry_cpu_s": round(cpu, 3)}
    if loop:
        stream["entry_loop_busy_s"] = loop["entry_loop_busy_s"]
    return {"prompt_tokens": PROBE_PROMPT_TOKENS, "new_tokens": 1, "alone_ttft_s": ttfts(alone),
            "burst": burst, "burst_ttft_s": ttfts(wave), "stream": stream}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def summarize(records: list[dict], wall_s: float) -> dict:
    ok = [r for r in records if "error" not in r]
    ttft = [r["times"][0] - r["start"] for r in ok if r["times"]]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    counts = [r.get("tokens", len(r["times"])) for r in ok]
    tokens = sum(counts)
    out = {"requests": len(records), "errors": len(records) - len(ok), "tokens": tokens,
           "tokens_per_request_min": min(counts, default=0),
           "wall_s": round(wall_s, 3), "tokens_per_s": round(tokens / wall_s, 1) if wall_s > 0 else None}
    for name, vals in (("ttft", ttft), ("itl", itl)):
        for q in (50, 99):
            p = percentile(vals, q)
            out[f"{name}_p{q}_s"] = None if p is None else round(p, 5)
    out.update(steady_state(ok))
    engine_ttft = [r["engine_ttft_s"] for r in ok if isinstance(r.get("engine_ttft_s"), (int, float))]
    if engine_ttft:  # submit: how much of the TTFT stage 0 saw
        out["engine_ttft_p50_s"], out["engine_ttft_p99_s"] = percentile(engine_ttft, 50), percentile(engine_ttft, 99)
    if len(ok) < len(records):
        out["first_error"] = next(r["error"] for r in records if "error" in r)
    return out


def steady_state(ok: list[dict]) -> dict:
    """The level without its ramp-up and drain: from the first request's end (every client has sent, and
    the first wave's prompts are in) to the last request's start (no client has stopped yet), the closed
    loop holds `concurrency` requests in flight.  Tokens streamed in that window over its length, and the
    TTFTs of the requests started in it (the first wave's synchronized burst is out of them)."""
    timed = [r for r in ok if r.get("times")]
    if not timed:
        return {}
    a, b = min(r["end"] for r in timed), max(r["start"] for r in timed)
    if b - a <= 0:
        return {}
    n = sum(a <= t <= b for r in timed for t in r["times"])
    ttft = [r["times"][0] - r["start"] for r in timed if a <= r["start"] <= b]
    out = {"steady_window_s": round(b - a, 3), "steady_tokens_per_s": round(n / (b - a), 1),
           "steady_requests": len(ttft)}
    for q in (50, 99):
        p = percentile(ttft, q)
        out[f"steady_ttft_p{q}_s"] = None if p is None else round(p, 5)
    return out


def engine_step_s(engine: dict, c: int) -> float:
    """The engine's decode step at batch c in this run (over the served contexts where measured; the largest
    batch measured when c was not)."""
    rows = {e["batch"]: e["ms_per_step"] for e in engine.get("engine_full") or engine.get("engine") or []}
    return (rows.get(c) or max(rows.values(), default=0.0)) / 1e3


def request_period_s(engine: dict, c: int, new_tokens: int) -> float:
    """One request's expected time at concurrency c from the engine of this run: its prefill plus
    new_tokens decode steps at batch c (over the served contexts where measured)."""
    return engine.get("prefill_ms", 0.0) / 1e3 + new_tokens * engine_step_s(engine, c)


def engine_ceiling(engine: dict, c: int, prompt_tokens: int, new_tokens: int, rows: str = "engine") -> float | None:
    """Tokens/s of the engine alone doing this level's work with nothing else in the way: c prompts
    prefilled at its best batched rate, then new_tokens decode steps at batch c (step time from `rows`)."""
    step = {e["batch"]: e["ms_per_step"] for e in engine.get(rows) or []}.get(c)
    rate = (engine.get("prefill_batch") or {}).get("tokens_per_s")
    if step is None or not rate:
        return None
    return c * new_tokens / (c * prompt_tokens / rate + new_tokens * step / 1e3)


def add_ratios(row: dict, engine: dict) -> None:
    """Serving over the engine of this run: tokens/s vs the engine at batch = concurrency, ITL vs the
    engine's batch-1 step (and its batch-c step), TTFT vs the engine's prefill of one prompt."""
    by_batch = {e["batch"]: e for e in engine["engine"]}
    eng_c, eng_1 = by_batch.get(row["concurrency"]), by_batch.get(1)
    div = lambda a, b: None if a is None or not b else round(a / b, 3)  # noqa: E731
    row["ratio_tokens"] = div(row["tokens_per_s"], eng_c and eng_c["tokens_per_s"])
    row["ratio_steady_tokens"] = div(row.get("steady_tokens_per_s"), eng_c and eng_c["tokens_per_s"])
    ceiling = engine_ceiling(engine, row["concurrency"], engine.get("prompt_tokens", 0), engine.get("new_tokens", 0))
    row["engine_ceiling_tokens_per_s"] = None if ceiling is None else round(ceiling, 1)
    row["ratio_tokens_vs_ceiling"] = div(row["tokens_per_s"], ceiling)
    full = {e["batch"]: e for e in engine.get("engine_full") or []}.get(row["concurrency"])
    row["ratio_tokens_full"] = div(row["tokens_per_s"], full and full["tokens_per_s"])
    row["ratio_tokens_vs_ceiling_full"] = div(row["tokens_per_s"], engine_ceiling(
        engine, row["concurrency"], engine.get("prompt_tokens", 0), engine.get("new_tokens", 0), "engine_full"))
    row["ratio_itl_p50_vs_engine_b1"] = div(row["itl_p50_s"], eng_1 and eng_1["ms_per_step"] / 1e3)
    row["ratio_itl_p50_vs_engine_bc"] = div(row["itl_p50_s"], eng_c and eng_c["ms_per_step"] / 1e3)
    row["ratio_ttft_p50_vs_prefill"] = div(row["ttft_p50_s"], engine["prefill_ms"] / 1e3)


# ---- the run -----------------------------------------------------------------------------

def run(args) -> dict:
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    import torch

    from hexswarm.model.config import LlamaConfig
    from hexswarm.runtime.tokenizer import TextTokenizer

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu --tiny for the CPU code path)")
    work = Path(tempfile.mkdtemp(prefix="hexswarm-serve-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    t_start = time.perf_counter()
    try:
        model_dir = prepare_model(args, work, log)
        cfg = LlamaConfig.from_dir(model_dir)
        tokenizer = TextTokenizer(model_dir, cfg)
        prompt = exact_prompt(tokenizer, args.prompt_tokens)
        probe_prompt = exact_prompt(tokenizer, PROBE_PROMPT_TOKENS)
        levels = _csv_ints(args.concurrency)
        res: dict = {"device": _device_name(args.device), "date": time.strftime("%Y-%m-%d"),
                     "model": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
                               "kv_heads": cfg.num_key_value_heads, "intermediate": cfg.intermediate_size,
                               "vocab": cfg.vocab_size, "tiny": bool(args.tiny)},
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                     "node_extra": args.variants[0], "node_defaults": node_defaults()}
        batches = sorted(set(_csv_ints(args.engine_batches)) | set(levels))
        res.update(measure_engine(args, model_dir, batches, log))
        res["serve"] = []
        if len(args.variants) > 1:
            res["variants"] = args.variants
        for variant, stages in [(v, n) for v in args.variants for n in _csv_ints(args.stages)]:
            args.node_extra = variant
            t = time.perf_counter()
            swarm, target = start_swarm(args, work, model_dir, stages, cfg.num_hidden_layers, max(levels))
            log(f"swarm of {stages} stage(s) {json.dumps(variant)} up in {time.perf_counter() - t:.0f} s")
            try:
                for frontend in [f for f in args.frontends.split(",") if f]:
                    gen = LoadGenerator(frontend, target, max(1, min(args.client_procs, max(levels))))
                    try:
                        gen.run(min(max(levels), 8), min(max(levels), 8), prompt, 4)  # warm-up: first allocations, connections
                        if args.entry_probe and frontend != "http-whole":
                            probe = entry_probe(gen, probe_prompt, max(levels), swarm.nodes[0].proc.pid,
                                                target["url"])
                            res.setdefault("entry_probe", []).append({"stages": stages, "frontend": frontend, **probe})
                        for c, arrival in [(c, a) for c in levels for a in args.arrivals]:
                            n = args.requests_per_level or max(4, (args.waves or 2) * c)
                            period = request_period_s(res, c, args.new_tokens) if arrival == "staggered" else 0.0
                            think = engine_step_s(res, c) if arrival == "staggered" else 0.0
                            node_pids, gen_pids = [nd.proc.pid for nd in swarm.nodes], [p.pid for p in gen.procs]
                            cpu0, loop0 = (cpu_seconds(node_pids), cpu_seconds(gen_pids)), entry_loop(target["url"])
                            with profiling(args, swarm, f"{stages}:{frontend}:{c}"):
                                records, wall = gen.run(c, n, prompt, args.new_tokens, staggered_starts(c, period),
                                                        think)
                            cpu1, loop1 = (cpu_seconds(node_pids), cpu_seconds(gen_pids)), entry_loop(target["url"])
                            row = {"stages": stages, "frontend": frontend, "concurrency": c, "node_extra": variant,
                                   "arrival": arrival, "stagger_period_s": round(period, 4),
                                   "think_max_s": round(think, 5),
                                   **summarize(records, wall),
                                   # cores busy during the level (from ready to last record; wall is first send to last token)
                                   "cpu_nodes_s": round(cpu1[0] - cpu0[0], 2),
                                   "cpu_clients_s": round(cpu1[1] - cpu0[1], 2), **loop_delta(loop0, loop1, wall)}
                            if args.records:
                                t_0 = min(r["start"] for r in records)
                                row["records"] = [[round(r["start"] - t_0, 4),
                                                   round(r["times"][0] - t_0, 4) if r.get("times") else None,
                                                   round(r["end"] - t_0, 4), r.get("tokens", len(r.get("times", [])))]
                                                  for r in sorted(records, key=lambda r: r["start"])]
                            add_ratios(row, res)
                            res["serve"].append(row)
                            if args.json:  # after every level: a run cut short keeps what it measured
                                Path(args.json).write_text(json.dumps(res, indent=1))
                            log(f"{stages} stage(s) {frontend} c={c} {arrival}: {row['tokens_per_s']} tokens/s, TTFT p50 "
                                f"{row['ttft_p50_s']} s, ITL p50 {row['itl_p50_s']} s, x engine {row['ratio_tokens']}; steady "
                                f"{row.get('steady_tokens_per_s')} tokens/s (x engine {row.get('ratio_steady_tokens')}), "
                                f"TTFT p99 {row.get('steady_ttft_p99_s')} s"
                                + (f", {row['errors']} errors: {row.get('first_error')}" if row["errors"] else ""))
                    finally:
                        gen.close()
                logs = [node.log() for node in swarm.nodes]
                # what held the entry's event loop for 20 ms or more (runtime/loop_watch.py logs each, <= 1/s)
                res.setdefault("entry_loop_held", []).append(
                    {"stages": stages, "node_extra": variant,
                     "lines": [ln for ln in logs[0].splitlines() if "event loop held" in ln][-100:]})
                linked = sum("local link to" in t for t in logs)
                on_gpu = sum("(on the GPU)" in t for t in logs)
                log(f"{stages} stage(s): {linked} of {len(swarm.nodes)} nodes sent steps over local links, "
                    f"{on_gpu} of them on the GPU")
            finally:
                swarm.stop()
        res["cpu_target"] = cpu_target(res) if args.cpu_target else None
        res["total_s"] = round(time.perf_counter() - t_start, 1)
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cpu_target(res: dict) -> dict | None:
    """The CPU goal per HTTP mode: streamed (SSE, one event per token) and whole (one JSON answer)."""
    out = {}
    for frontend in ("http", "http-whole"):
        rows = {r["concurrency"]: r for r in res["serve"] if r["frontend"] == frontend and r["stages"] == 1}
        if 1 not in rows or 32 not in rows or not rows[1]["tokens_per_s"]:
            continue
        speedup = rows[32]["tokens_per_s"] / rows[1]["tokens_per_s"]
        ceilings = [rows[c].get("engine_ceiling_tokens_per_s") for c in (1, 32)]
        out[frontend] = {"tokens_per_s_1": rows[1]["tokens_per_s"], "tokens_per_s_32": rows[32]["tokens_per_s"],
                         "speedup": round(speedup, 2), "target": CPU_TARGET, "met": speedup >= CPU_TARGET,
                         # the same ratio for the engine alone doing the same work (prefill + decode): what any
                         # server of this engine could reach on this load
                         "engine_ceiling_speedup": round(ceilings[1] / ceilings[0], 2) if all(ceilings) else None}
    return out or None


def _device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def table(res: dict) -> str:
    f = lambda v, nd=1: "—" if v is None else f"{v:.{nd}f}"  # noqa: E731
    lines = [f"engine: prefill {res['prompt_tokens']} tokens {res['prefill_ms']:.2f} ms; decode "
             + ", ".join(f"b{e['batch']} {e['ms_per_step']:.2f} ms ({e['tokens_per_s']:.0f} tok/s)" for e in res["engine"])
             + (f"; batched prefill {res['prefill_batch']['tokens_per_s']} tok/s" if res.get("prefill_batch") else "")
             + ("; over the requests' contexts: " + ", ".join(f"b{e['batch']} {e['ms_per_step']:.2f} ms"
                                                          for e in res["engine_full"]) if res.get("engine_full") else ""),
             "",
             "| stages | front end | conc | arrival | tok/s | x engine tok/s | steady x engine | x ceiling | x engine, full ctx | "
             "x ceiling, full ctx | TTFT p50 ms | TTFT p99 ms | steady TTFT p99 ms | x prefill | ITL p50 ms | ITL p99 ms | "
             "ITL x engine b1 | errors | cores busy: nodes / clients | entry loop busy | entry loop runs >= 20 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ms = lambda v: None if v is None else v * 1e3  # noqa: E731
    cores = lambda r, k: f(r[k] / r["wall_s"], 2) if r.get(k) is not None and r.get("wall_s") else "—"  # noqa: E731
    for r in res["serve"]:
        lines.append(f"| {r['stages']} | {r['frontend']} | {r['concurrency']} | {r.get('arrival', 'burst')} | "
                     f"{f(r['tokens_per_s'])} | {f(r['ratio_tokens'], 3)} | {f(r.get('ratio_steady_tokens'), 3)} | "
                     f"{f(r.get('ratio_tokens_vs_ceiling'), 3)} | {f(r.get('ratio_tokens_full'), 3)} | "
                     f"{f(r.get('ratio_tokens_vs_ceiling_full'), 3)} | {f(ms(r['ttft_p50_s']))} | {f(ms(r['ttft_p99_s']))} | "
                     f"{f(ms(r.get('steady_ttft_p99_s')))} | "
                     f"{f(r['ratio_ttft_p50_vs_prefill'], 2)} | {f(ms(r['itl_p50_s']), 2)} | {f(ms(r['itl_p99_s']), 2)} | "
                     f"{f(r['ratio_itl_p50_vs_engine_b1'], 2)} | {r['errors']} | {cores(r, 'cpu_nodes_s')} / "
                     f"{cores(r, 'cpu_clients_s')} | {f(r.get('entry_loop_busy_share'), 2)} | "
                     f"{r.get('entry_loop_slow_batches', '—')} |")
    for mode, t in (res.get("cpu_target") or {}).items():
        lines += ["", f"CPU target (tiny, {mode}, 1 node): {t['tokens_per_s_32']} tok/s at 32 / {t['tokens_per_s_1']} at 1 "
                      f"= {t['speedup']}x (target >= {t['target']:g}x: {'met' if t['met'] else 'not met'}; the engine alone "
                      f"on the same work: {t.get('engine_ceiling_speedup')}x)"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = run(args)
    res["table"] = table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print()
    print(f"device: {res['device']}; model {res['model']}; {res['date']}; {res['total_s']} s in all")
    print(res["table"])
    return res


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Chaos run: a local swarm under a stream of requests while peers are killed (SIGKILL, then
restarted) or frozen (SIGSTOP, then SIGCONT) on a schedule.

    python tools/chaos.py [--nodes 2,1,2,1] [--duration 60] [--rate 2] [--every 8] [--seed 0] [--json]

Reports requests accepted, completed, correct (token for token equal to an uninterrupted
`generate`), lost (accepted, never completed), duplicated (a token index delivered twice or
a streamed sequence that differs from the final one), and refused (a clear error such as busy).
Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio  # noqa: E402

from hexswarm.errors import UserError  # noqa: E402
from hexswarm.model.tiny import make_tiny_llama  # noqa: E402
from hexswarm.runtime.offline import GenerateJob, generate  # noqa: E402
from hexswarm.swarm.launcher import LocalSwarm  # noqa: E402
from hexswarm.swarm.submit import submit_with_failover  # noqa: E402

PROMPTS = ["Hello, world!", "Once upon a time", "The quick brown fox", "0123456789", "Pipeline stages"]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.records: list[dict] = []

    def add(self, rec: dict) -> None:
        with self.lock:
            self.records.append(rec)


def one_request(i: int, addrs: list[str], new_tokens: int, tally: Tally) -> None:
    prompt = f"{PROMPTS[i % len(PROMPTS)]} #{i}"
    frames: list[dict] = []
    rec = {"i": i, "prompt": prompt, "accepted": False, "final": None, "error": None}
    try:
        final = trio.run(submit_with_failover, addrs, {"prompt": prompt, "max_new_tokens": new_tokens, "stream": True},
                         frames.append, 240.0)
        rec["final"] = final
    except UserError as e:
        rec["error"] = str(e)
    rec["accepted"] = any("accepted" in f for f in frames)
    rec["streamed"] = [(f["index"], f["token"]) for f in frames if "token" in f]
    tally.add(rec)


def chaos(swarm: LocalSwarm, stop: threading.Event, every: float, rng: random.Random, events: list) -> None:
    """Every `every` s one node (never the first: the bootstrap) is killed or frozen, and brought back."""
    while not stop.wait(every):
        victim = rng.choice(swarm.nodes[1:])
        if rng.random() < 0.5:
            victim.kill(signal.SIGKILL)
            events.append((round(time.monotonic(), 1), "SIGKILL", victim.peer_id[:16]))
            if stop.wait(every / 2):
                break
            victim.start([swarm.nodes[0].addr])
            events.append((round(time.monotonic(), 1), "restart", victim.peer_id[:16]))
        else:
            victim.kill(signal.SIGSTOP)
            events.append((round(time.monotonic(), 1), "SIGSTOP", victim.peer_id[:16]))
            stop.wait(every / 2)
            victim.kill(signal.SIGCONT)
            events.append((round(time.monotonic(), 1), "SIGCONT", victim.peer_id[:16]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="2,1,2,1", help="devices per node")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--rate", type=float, default=2.0, help="requests per second")
    ap.add_argument("--every", type=float, default=8.0, help="seconds between faults")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="hexswarm-chaos-"))
    model = make_tiny_llama(work / "model")
    swarm = LocalSwarm(work / "nodes", model, [int(n) for n in a.nodes.split(",")],
                       serve_layout={"hetero_config": [2, 1], "pp_partition": [2, 2], "replicas": a.replicas})
    tally, events, threads = Tally(), [], []
    stop = threading.Event()
    try:
        swarm.start()
        swarm.wait_layout(120)
        addrs = [n.addr for n in swarm.nodes]
        fault = threading.Thread(target=chaos, args=(swarm, stop, a.every, rng, events), daemon=True)
        fault.start()
        t_end = time.monotonic() + a.duration
        i = 0
        while time.monotonic() < t_end:
            entry_order = rng.sample(addrs, len(addrs))
            t = threading.Thread(target=one_request, args=(i, entry_order, a.new_tokens, tally), daemon=True)
            t.start()
            threads.append(t)
            i += 1
            time.sleep(rng.expovariate(a.rate))
        stop.set()
        fault.join()
        for t in threads:
            t.join(300)
    finally:
        stop.set()
        for node in swarm.nodes:
            if node.alive():
                node.kill(signal.SIGCONT)
        swarm.stop()
    refs: dict[str, list[int]] = {}
    report = {"submitted": len(tally.records), "accepted": 0, "completed": 0, "correct": 0, "lost": 0,
              "duplicated": 0, "refused": 0, "faults": events, "errors": {}}
    for rec in tally.records:
        final = rec["final"] or {}
        done = final.get("done")
        if rec["accepted"] or done:
            report["accepted"] += 1
        if done:
            report["completed"] += 1
            if rec["prompt"] not in refs:
                refs[rec["prompt"]] = generate(GenerateJob(model_dir=str(model), prompt=rec["prompt"],
                                                           max_new_tokens=a.new_tokens))["tokens"]
            report["correct"] += done["tokens"] == refs[rec["prompt"]]
            idx = [k for k, _ in rec["streamed"]]
            if idx != list(range(len(idx))) or [t for _, t in rec["streamed"]] != done["tokens"]:
                report["duplicated"] += 1
        else:
            report["lost" if rec["accepted"] else "refused"] += 1
            why = rec["error"] or json.dumps(final.get("error"))
            report["errors"][why[:160]] = report["errors"].get(why[:160], 0) + 1
    if a.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            if k not in ("faults", "errors"):
                print(f"{k:>10}: {v}")
        print(f"    faults: {len(events)}: " + ", ".join(f"{e[1]} {e[2]}" for e in events))
        for why, n in report["errors"].items():
            print(f"    {n} x {why}")
    return 0 if report["lost"] == 0 and report["duplicated"] == 0 and report["correct"] == report["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())

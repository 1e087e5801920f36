#!/usr/bin/env python3
"""Which of hexswarm's files a prompt's path runs through, measured: `hexswarm submit` to its first token.

Starts a local swarm of four CPU nodes serving the tiny model on a pinned two-stage layout (TP 1, 2 layers each),
picks as the entry a node that is neither the head nor a stage (so the request crosses entry -> head -> stage 0 ->
stage 1 -> stage 0 -> entry), and warms it with one request.  Every process of the swarm and the CLI runs under a
profile hook (a `sitecustomize` this tool writes) that records the hexswarm source files whose functions run,
between a start signal (SIGUSR1) and a dump signal (SIGUSR2).  Then, alternately, windows with nothing submitted
(idle: heartbeats, gossip, probes) and windows around one `hexswarm submit --max-new-tokens 1` (the first token is
the last).  A file is on the prompt's path when it ran in a request window (in a node or in the CLI); those that
ran in an idle window only with functions that also run idle are listed apart (work the node does anyway:
heartbeats, gossip, an idle engine's loop); a file with a function that ran only for the request is on the path.

    python tools/prompt_path.py [--json OUT] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hexswarm.launcher import LocalSwarm  # noqa: E402

LAYOUT = {"hetero_config": [1, 1], "pp_partition": [2, 2], "replicas": 1}

# runs at the start of every Python process whose PYTHONPATH holds its folder
SITECUSTOMIZE = '''
import os
if os.environ.get("HEXSWARM_PATH_TRACE"):
    import atexit, signal, sys, threading
    _out, _src = os.environ["HEXSWARM_PATH_TRACE"], os.environ["HEXSWARM_PATH_SOURCE"]
    _seen, _on = set(), [os.environ.get("HEXSWARM_PATH_TRACE_NOW") == "1"]

    def _profile(frame, event, arg):
        # functions only (CO_OPTIMIZED): a module's or a class's body runs on import, which is not the path
        if _on[0] and event == "call" and frame.f_code.co_flags & 1:
            code = frame.f_code
            if code.co_filename.startswith(_src):
                _seen.add(f"hexswarm/{code.co_filename[len(_src):]}:{code.co_firstlineno}:{code.co_name}")

    def _start(*_):
        _seen.clear()
        _on[0] = True

    def _dump(*_):
        _on[0] = False
        tag = os.environ.get("HEXSWARM_PATH_TAG") or open(os.path.join(_out, "window")).read().strip()
        with open(os.path.join(_out, f"{tag}.{os.getpid()}"), "w") as fh:
            fh.write("\\n".join(sorted(_seen)))

    sys.setprofile(_profile)
    threading.setprofile(_profile)
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _dump)
    if _on[0]:
        atexit.register(_dump)
'''


def signal_all(groups: list[int], sig: int) -> None:
    """Every process of the swarm: each node runs in a process group of its own with its engine processes
    and TP followers (hexswarm/launcher.py)."""
    for group in groups:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass


def window(out: Path, groups: list[int], tag: str, during) -> None:
    (out / "window").write_text(tag)
    signal_all(groups, signal.SIGUSR1)
    time.sleep(0.2)
    during()
    time.sleep(0.2)
    signal_all(groups, signal.SIGUSR2)
    time.sleep(1.0)  # the dumps


def files_of(out: Path, prefix: str) -> set[str]:
    seen: set[str] = set()
    for f in out.glob(f"{prefix}*"):
        if f.name != "window":
            seen |= {line for line in f.read_text().splitlines() if line}
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the lists here")
    ap.add_argument("--rounds", type=int, default=3, help="idle and request windows, each (default 3)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hexswarm-path-"))
    os.chdir(work)  # every process imports hexswarm from ROOT (PYTHONPATH), not from a checkout in the cwd
    out = work / "trace"
    out.mkdir()
    hook = work / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    os.environ["HEXSWARM_PATH_TRACE"] = str(out)
    os.environ["HEXSWARM_PATH_SOURCE"] = str(ROOT / "hexswarm") + "/"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")])
    from hexswarm.model.tiny import make_tiny_llama

    model = make_tiny_llama(work / "tiny")
    swarm = LocalSwarm(work / "swarm", model, [1, 1, 1, 1], serve_layout=LAYOUT).start()
    try:
        status = swarm.wait_layout(120)
        stages = {st["peer"] for r in status["replicas"] for st in r["stages"]}
        entry = next(n for n in swarm.nodes if n.peer_id not in stages and n.peer_id != status["head"])
        cli = [sys.executable, "-m", "hexswarm", "submit", "--peer", entry.addr, "--prompt", "Once upon a time",
               "--max-new-tokens", "1", "--json"]

        def submit(trace: bool) -> float:
            env = {**os.environ, "HEXSWARM_PATH_TRACE_NOW": "1" if trace else "0", "HEXSWARM_PATH_TAG": "cli"}
            t0 = time.monotonic()
            subprocess.run(cli, check=True, env=env, capture_output=True, timeout=120)
            return time.monotonic() - t0

        submit(False)  # warm: connections, lazy imports, first steps
        groups = [n.proc.pid for n in swarm.nodes]
        took = []
        for i in range(a.rounds):
            window(out, groups, f"idle{i}", lambda: time.sleep(max(took or [3.0])))
            window(out, groups, f"request{i}", lambda: took.append(submit(True)))
        idle = files_of(out, "idle")
        request = files_of(out, "request") - idle  # functions that ran only for the request
        client = files_of(out, "cli")
        path = {fn.split(":")[0] for fn in request | client}
        background = {fn.split(":")[0] for fn in files_of(out, "request") | idle} - path
        result = {"rounds": a.rounds, "submit_s": took, "count": len(path), "path": sorted(path),
                  "client": sorted({fn.split(":")[0] for fn in client}),
                  "functions": sorted(request | client), "background": sorted(background)}
    finally:
        swarm.stop()
    print(f"{result['count']} files on the path of a prompt (a function of each ran for the request):")
    for f in result["path"]:
        print("  ", f, "(client)" if f in result["client"] else "")
    print("files that ran in the windows only as they do idle:", ", ".join(result["background"]))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

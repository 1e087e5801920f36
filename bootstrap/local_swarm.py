#!/usr/bin/env python3
"""Start a local swarm of hexswarm nodes on 127.0.0.1 serving a model.

    python bootstrap/local_swarm.py --demo                 # what `make demo` runs
    python bootstrap/local_swarm.py --nodes 2,1,1 --model DIR [--keep]

--demo makes the built-in tiny random-weight model (its text is gibberish by
design: it proves the path, not the prose), starts 3 nodes (the first with two
devices, so its stage runs at TP 2), waits for the layout, submits a prompt,
prints the answer and the layout, and stops the swarm.  --keep leaves the swarm
running until Ctrl-C and prints each node's address for `hexswarm submit`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hexswarm.swarm.launcher import LocalSwarm  # noqa: E402

DEMO_LAYOUT = {"hetero_config": [2, 1], "pp_partition": [2, 2], "replicas": 1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", action="store_true", help="tiny model, 3 nodes, one prompt, then stop")
    ap.add_argument("--model", help="checkpoint directory (default: a tiny random model)")
    ap.add_argument("--nodes", default="2,1,1", help="devices per node, comma-separated (default 2,1,1)")
    ap.add_argument("--pin", action="store_true", help="pin the demo layout (TP 2 + TP 1) instead of planning")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--keep", action="store_true", help="keep the swarm running until Ctrl-C")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hexswarm-swarm-"))
    model = Path(a.model) if a.model else None
    if model is None:
        from hexswarm.model.tiny import make_tiny_llama

        model = make_tiny_llama(work / "tiny-llama")
        print(f"tiny model written to {model}")
    devices = [int(n) for n in a.nodes.split(",")]
    pin = DEMO_LAYOUT if (a.demo or a.pin) else None
    swarm = LocalSwarm(work / "nodes", model, devices, serve_layout=pin)
    try:
        t0 = time.monotonic()
        from rich.console import Console

        with Console(stderr=True).status(f"starting {len(devices)} nodes ..."):
            swarm.start()
        with Console(stderr=True).status("waiting for the layout: plan, load the stage shards, commit ..."):
            status = swarm.wait_layout(120)
        print(f"layout epoch {status['layout']['epoch']} committed in {time.monotonic() - t0:.1f} s "
              f"(head {status['head'][:16]}...):")
        for r, replica in enumerate(status["replicas"]):
            for s, st in enumerate(replica["stages"]):
                print(f"  replica {r} stage {s}: peer {st['peer'][:16]}...  TP {st['tp']}  layers {st['layers'][0]}-{st['layers'][1] - 1}")
        for node in swarm.nodes:
            print(f"  node {node.addr}")
        if a.demo or not a.keep:
            import trio

            from hexswarm.swarm.submit import submit_to

            entry = swarm.nodes[-1]
            print(f"submitting {a.prompt!r} through {entry.peer_id[:16]}...")
            final = trio.run(submit_to, entry.addr, {"prompt": a.prompt, "max_new_tokens": 24})
            if "error" in final:
                print(f"error: {final['error']}", file=sys.stderr)
                return 1
            done = final["done"]
            print(f"answer ({len(done['tokens'])} tokens, finish={done['finish_reason']}): {done['text']!r}")
            print(f"served by replica {done['replica']}: TP {done['layout']['hetero_config']} / layers "
                  f"{done['layout']['pp_partition']}; time to first token {done['timings']['ttft_s']} s")
        if a.keep:
            print("swarm running; Ctrl-C to stop")
            while True:
                time.sleep(1)
        return 0
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        swarm.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

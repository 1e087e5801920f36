#!/usr/bin/env python3
"""Start a local swarm of hexswarm nodes on 127.0.0.1 serving a model.

    python bootstrap/local_swarm.py --demo                 # what `make demo` runs
    python bootstrap/local_swarm.py --nodes 2,1,1 --model DIR [--keep]

--demo serves SmolLM2-135M-Instruct (a Q4_1 GGUF installed by `make model`) on 3 nodes with
a pinned asymmetric layout (the first node's 3 devices run layers 0-19 at TP 3, the second
node layers 20-29 at TP 1; the third node is an entry), waits for the layout, asks a chat
question through the chat template, prints the answer and the layout, and stops the swarm.
Without --model (and without --demo) it serves the built-in tiny random-weight model (its
text is gibberish by design).  --keep leaves the swarm running until Ctrl-C and prints each
node's address for `hexswarm submit`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hexswarm.launcher import LocalSwarm  # noqa: E402

# SmolLM2-135M has 9 query heads over 3 KV heads: TP 1 or 3
DEMO_LAYOUT = {"hetero_config": [3, 1], "pp_partition": [20, 10], "replicas": 1}
DEMO_NODES = "3,1,1"
DEMO_QUESTION = "What is the capital of France?"
TINY_LAYOUT = {"hetero_config": [2, 1], "pp_partition": [2, 2], "replicas": 1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", action="store_true", help="SmolLM2-135M-Instruct, 3 nodes, one chat question, then stop")
    ap.add_argument("--model", help="checkpoint directory or .gguf file (default: a tiny random model)")
    ap.add_argument("--nodes", default=None, help="devices per node, comma-separated (default 2,1,1; --demo: 3,1,1)")
    ap.add_argument("--pin", action="store_true", help="pin the demo layout instead of planning")
    ap.add_argument("--prompt", default=None, help="default: 'Once upon a time' (--demo: a chat question)")
    ap.add_argument("--chat", action="store_true", help="apply the model's chat template to --prompt (on with --demo)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--keep", action="store_true", help="keep the swarm running until Ctrl-C")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hexswarm-swarm-"))
    model = Path(a.model) if a.model else None
    if model is None and a.demo:
        from hexswarm.model.smollm2 import smollm2_path

        model = smollm2_path()
        print(f"serving {model.name}")
    elif model is None:
        from hexswarm.model.tiny import make_tiny_llama

        model = make_tiny_llama(work / "tiny-llama")
        print(f"tiny model written to {model}")
    real = a.demo and not a.model
    devices = [int(n) for n in (a.nodes or (DEMO_NODES if real else "2,1,1")).split(",")]
    pin = (DEMO_LAYOUT if real else TINY_LAYOUT) if (a.demo or a.pin) else None
    chat = a.chat or real
    prompt = a.prompt or (DEMO_QUESTION if real else "Once upon a time")
    swarm = LocalSwarm(work / "nodes", model, devices, serve_layout=pin)
    try:
        t0 = time.monotonic()
        from rich.console import Console

        with Console(stderr=True).status(f"starting {len(devices)} nodes ..."):
            swarm.start()
        with Console(stderr=True).status("waiting for the layout: plan, load the stage shards, commit ..."):
            status = swarm.wait_layout(300)  # a real model on shared CPU cores: loads take a while
        print(f"layout epoch {status['layout']['epoch']} committed in {time.monotonic() - t0:.1f} s "
              f"(head {status['head'][:16]}...):")
        for r, replica in enumerate(status["replicas"]):
            for s, st in enumerate(replica["stages"]):
                print(f"  replica {r} stage {s}: peer {st['peer'][:16]}...  TP {st['tp']}  layers {st['layers'][0]}-{st['layers'][1] - 1}")
        for node in swarm.nodes:
            print(f"  node {node.addr}")
        if a.demo or not a.keep:
            import trio

            from hexswarm.api.client import submit_to

            entry = swarm.nodes[-1]
            text = prompt
            if chat:
                from hexswarm.runtime.chat import ChatTemplate

                text = ChatTemplate.for_model(model).render([{"role": "user", "content": prompt}])
            print(f"asking {prompt!r}{' (chat template applied)' if chat else ''} through {entry.peer_id[:16]}...")
            final = trio.run(submit_to, entry.addr, {"prompt": text, "max_new_tokens": a.max_new_tokens})
            if "error" in final:
                print(f"error: {final['error']}", file=sys.stderr)
                return 1
            done = final["done"]
            print(f"answer ({len(done['tokens'])} tokens, finish={done['finish_reason']}): {done['text'].strip()!r}")
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

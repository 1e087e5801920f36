"""A tensor-parallel follower rank of a served stage (started by StageHost).

It loads its shard, then runs whatever ops its leader broadcasts until told to
stop; it exits if its parent process goes away.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

from hexswarm.runtime.stage_host import StageSpec, build_executor, make_group


def exit_with_parent(parent: int) -> None:
    """End this process when its parent goes away (a SIGKILLed node leaves no orphans)."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(0)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", nargs=2, type=int, required=True)
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--first", action="store_true")
    ap.add_argument("--last", action="store_true")
    ap.add_argument("--gpus", nargs="*", type=int, default=[])
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--kv-tokens", type=int, default=0)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--store-port", type=int, required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--parent", type=int, required=True)
    a = ap.parse_args()
    exit_with_parent(a.parent)
    import torch

    torch.set_num_threads(1)
    spec = StageSpec(a.model, a.layers[0], a.layers[1], a.tp, a.first, a.last, a.device, a.dtype,
                     a.max_batch, a.max_seq_len, tuple(a.gpus),
                     a.quantize, a.kv_tokens)
    pg, _store = make_group(a.device, a.store_port, a.tag, a.rank, a.tp, False)
    build_executor(spec, a.rank, pg).follow()


if __name__ == "__main__":
    main()

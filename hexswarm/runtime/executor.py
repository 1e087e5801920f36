"""Runs one stage shard on one rank; a stage leader drives its tensor-parallel followers.

An op is a dict: {"op": "forward", "slots": [...], "start": [...], "x": hidden [B,T,H]}
(the first stage's leader may pass "ids" [B,T] instead of "x") or {"op": "stop"}.
The leader broadcasts each op to its TP group, so followers run the same op in the
same order; activations never go to ranks that do not need them.
"""

from __future__ import annotations

import torch

from hexswarm.model.kv_cache import KVCache
from hexswarm.model.stage import StageModel
from hexswarm.runtime.transport import broadcast_obj


class TensorParallelGroup:
    """The ranks of one stage; local rank 0 is the leader.  `pg` is a torch ProcessGroup."""

    def __init__(self, pg):
        self.pg = pg

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.pg.allreduce([t]).wait()
        return t

    def broadcast_op(self, op: dict | None) -> dict:
        return broadcast_obj(op, self.pg)


class StageExecutor:
    def __init__(self, model: StageModel, kv: KVCache, tp: TensorParallelGroup | None = None):
        self.model = model
        self.kv = kv
        self.tp = tp
        # One-token steps of a single-rank CUDA stage replay captured CUDA graphs; a TP stage
        # would need a graph-capturable all-reduce, and its ranks talk over gloo here.
        self.graphs = model.decode_graphs(kv) if tp is None and torch.device(model.device).type == "cuda" else None

    @torch.inference_mode()
    def lead(self, op: dict) -> torch.Tensor | None:
        """Leader: run op on the whole TP group; returns hidden [B,T,H], or logits [B,V] on the last stage."""
        if self.graphs is not None and op["op"] == "forward" and _one_token(op):
            inp = torch.as_tensor(op["ids"], dtype=torch.long) if "ids" in op else op["x"].to(self.model.dtype)
            # the runner returns a static buffer that the next step overwrites
            return self.graphs.step(inp, list(op["slots"]), list(op["start"])).clone()
        if op["op"] == "forward" and "ids" in op:
            ids = torch.as_tensor(op["ids"], dtype=torch.long, device=self.model.device)
            op = {k: v for k, v in op.items() if k != "ids"}
            op["x"] = self.model.embed(ids)
        if self.tp is not None:
            self.tp.broadcast_op(_cpu_op(op))
        if op["op"] == "stop":
            return None
        return self._forward(op)

    @torch.inference_mode()
    def follow(self) -> None:
        """Follower: run the leader's ops until it says stop."""
        while True:
            op = self.tp.broadcast_op(None)
            if op["op"] == "stop":
                return
            self._forward(op)

    def _forward(self, op: dict) -> torch.Tensor:
        x = op["x"].to(self.model.device, self.model.dtype)
        h = self.model(x, self.kv, list(op["slots"]), list(op["start"]), self.tp.all_reduce if self.tp else None)
        if self.model.lm_head is not None:
            return self.model.logits(h[:, -1])
        return h


def _one_token(op: dict) -> bool:
    if "ids" in op:
        return all(len(row) == 1 for row in op["ids"])
    return op["x"].shape[1] == 1


def _cpu_op(op: dict) -> dict:
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in op.items()}

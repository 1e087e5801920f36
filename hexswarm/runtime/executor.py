"""Runs one stage shard on one rank; a stage leader drives its tensor-parallel followers.

An op is a dict: {"op": "forward", "rows": [[slot, start, length], ...], "x": hidden [N, H],
"free": [slot, ...]} where the rows' new tokens lie back to back in x (the first stage's leader
may pass "ids", N token ids, instead of "x") and "free" (optional) names slots whose requests
ended: their KV blocks go back to the pool before the rows get theirs; or {"op": "stop"}.  The older uniform form
{"slots", "start", "ids" [B][T] | "x" [B, T, H]} is accepted too (`hexswarm generate`).
The leader broadcasts each op to its TP group, so followers run the same op in the
same order; activations never go to ranks that do not need them.
"""

from __future__ import annotations

import torch

from hexswarm.model.host_copy import to_device
from hexswarm.model.kv_cache import KVCache
from hexswarm.model.stage import StageModel
from hexswarm.runtime.transport import broadcast_obj

Rows = list[tuple[int, int, int]]


class TensorParallelGroup:
    """The ranks of one stage; local rank 0 is the leader.  `pg` is a torch ProcessGroup.

    `device` is where the group's messages live: NCCL only moves CUDA tensors, so a group on
    CUDA sends its op headers and activations as CUDA tensors (gloo takes either)."""

    def __init__(self, pg, device: torch.device | str = "cpu"):
        self.pg = pg
        self.device = torch.device(device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.pg.allreduce([t]).wait()
        return t

    def broadcast_op(self, op: dict | None, x: torch.Tensor | None = None, dtype: torch.dtype | None = None):
        """Leader: send (op, x); followers (op=None) get them.  x travels as a tensor of `dtype`
        on the group's device, not through the codec."""
        header = None if op is None else {**op, "x_shape": None if x is None else list(x.shape)}
        header = broadcast_obj(header, self.pg, self.device)
        shape = header.pop("x_shape")
        if shape is None:
            return header, None
        if x is None:
            x = torch.empty(shape, dtype=dtype, device=self.device)
        else:
            x = x.to(self.device, dtype).contiguous()
        self.pg.broadcast(x, 0).wait()
        return header, x


class StageExecutor:
    def __init__(self, model: StageModel, kv: KVCache, tp: TensorParallelGroup | None = None,
                 capture_graphs: bool = False):
        self.model = model
        self.kv = kv
        self.tp = tp
        # Steps of a single-rank CUDA stage replay captured CUDA graphs (decode steps, and steps
        # mixing decode rows with prompt chunks up to a token bucket); a TP stage
        # would need its all-reduce captured too, which the standalone groups here do not do.
        self.graphs = model.step_graphs(kv) if tp is None and torch.device(model.device).type == "cuda" else None
        if self.graphs is not None and capture_graphs:
            self.graphs.capture_all()
            self._warm_up_eager()

    def _warm_up_eager(self) -> None:
        """One eager mixed step on the scratch slot (a decode row and a prompt chunk), so the
        kernels of eager steps are compiled at load, not while a request waits."""
        kv = self.kv
        rows = [(kv.scratch_slot, 0, 1), (kv.scratch_slot, 1, 3)]
        with torch.inference_mode():
            if self.model.embedding is not None:
                x = self.model.embed(torch.zeros(4, dtype=torch.long, device=self.model.device))
            else:
                x = torch.zeros(4, self.model.cfg.hidden_size, dtype=self.model.dtype, device=self.model.device)
            self._forward(rows, x)
            torch.cuda.synchronize(self.model.device)

    @torch.inference_mode()
    def lead(self, op: dict) -> torch.Tensor | None:
        """Leader: run op on the whole TP group.  Returns hidden [N, H], or on the last stage
        float32 logits [R, V] of every row's last token."""
        if op["op"] == "stop":
            if self.tp is not None:
                self.tp.broadcast_op({"op": "stop"})
            return None
        rows, ids, x = normalize_forward(op)
        free = [int(s) for s in op.get("free") or ()]
        self.kv.release(free)
        if self.graphs is not None:
            out = self.graphs.run(torch.as_tensor(ids, dtype=torch.long) if ids is not None else x, rows)
            if out is not None:
                return out
        if ids is not None:
            x = self.model.embed(torch.as_tensor(ids, dtype=torch.long, device=self.model.device))
        if self.tp is not None:
            _, x = self.tp.broadcast_op({"op": "forward", "rows": rows, "free": free}, x, self.model.dtype)
        return self._forward(rows, x)

    @torch.inference_mode()
    def follow(self) -> None:
        """Follower: run the leader's ops until it says stop."""
        while True:
            op, x = self.tp.broadcast_op(None, dtype=self.model.dtype)
            if op["op"] == "stop":
                return
            self.kv.release(op.get("free") or ())  # the leader's frees, so every rank's blocks stay alike
            self._forward([tuple(r) for r in op["rows"]], x)

    def _forward(self, rows: Rows, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.model.device, self.model.dtype)
        h = self.model.forward_rows(x, self.kv, rows, self.tp.all_reduce if self.tp else None)
        if self.model.lm_head is None:
            return h
        last = [0] * len(rows)
        end = 0
        for i, r in enumerate(rows):
            end += r[2]
            last[i] = end - 1
        if end != len(rows):  # some row has several tokens: keep each row's last
            h = h.index_select(0, to_device(last, torch.long, h.device))
        return self.model.logits(h)


def normalize_forward(op: dict) -> tuple[Rows, list[int] | None, torch.Tensor | None]:
    """(rows, flat ids (a list, or a long tensor already on the device) or None, flat hidden
    [N, H] or None) from either op form."""
    ids, x = op.get("ids"), op.get("x")
    if "rows" in op:
        rows = [(int(s), int(p), int(n)) for s, p, n in op["rows"]]
        if ids is not None and not isinstance(ids, torch.Tensor):
            ids = list(ids)
        return rows, ids, x
    if ids is not None:
        T = len(ids[0])
        flat = [int(t) for row in ids for t in row]
    else:
        T = x.shape[1]
        flat = None
        x = x.reshape(-1, x.shape[-1])
    rows = [(int(s), int(p), T) for s, p in zip(op["slots"], op["start"])]
    return rows, flat, x


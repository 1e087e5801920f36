"""Turn the live peer table into a serving layout.

Three ways, in order: a layout shape pinned in the head's config
(`serve_layout`), the HexGen scheduler (hexswarm.plan) on the measured
inventories and links, or - if the scheduler finds nothing - one stage per
peer with layers in proportion to memory.  All are deterministic in the view
(and, pinned, the replicas kept from the committed layout), so any head computes
the same layout from the same table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hexswarm.errors import UserError
from hexswarm.model.config import LlamaConfig
from hexswarm.model.shard import check_tp_degree
from hexswarm.serve.layout import StageAssignment

log = logging.getLogger("hexswarm.planning")


@dataclass(frozen=True)
class PeerView:
    """What the planner knows of one serving peer."""

    peer: str
    devices: list[dict]  # inventory wire form: kind, name, memory_gib, tflops, mem_bw_gbs
    links: dict  # peer -> {"rtt_ms", "mbps"}
    calibration: dict = field(default_factory=dict)  # the record's measured engine speed ({}: none)

    def tp_capacity(self, cfg: LlamaConfig) -> int:
        """The largest valid TP degree over same-kind devices of this peer."""
        kinds: dict[str, int] = {}
        for d in self.devices:
            kinds[d.get("name", d.get("kind", "?"))] = kinds.get(d.get("name", d.get("kind", "?")), 0) + 1
        best = 1
        for n in kinds.values():
            for tp in range(n, 0, -1):
                try:
                    check_tp_degree(cfg, tp)
                except UserError:
                    continue
                best = max(best, tp)
                break
        return best

    @property
    def memory_gib(self) -> float:
        return sum(float(d.get("memory_gib", 0)) for d in self.devices)


def pinned_layout(cfg: LlamaConfig, peers: list[PeerView], shape: dict,
                  keep: list[list[StageAssignment]] = ()) -> list[list[StageAssignment]]:
    """Map a pinned shape {hetero_config, pp_partition, replicas} onto peers.

    First the replicas of `keep` (the committed layout's healthy ones) that still fit the shape
    and the view, as they are: their stages stay loaded and serve on in the new epoch, while a
    reshuffle would make peers load again (a TP-2 stage took 25-55 s on a loaded host) and leave
    requests waiting.  Then, for the rest, each stage needs one peer with at least its TP degree
    of devices; stages with the largest TP pick first, each the smallest peer that fits (ties by
    id), so the result only depends on the view.  As many replicas as fit, up to `replicas`.
    """
    hc, pp = list(shape["hetero_config"]), list(shape["pp_partition"])
    if len(hc) != len(pp) or sum(pp) != cfg.num_hidden_layers:
        raise UserError(f"serve_layout {hc} / {pp} does not fit the model's {cfg.num_hidden_layers} layers")
    free = sorted(peers, key=lambda p: p.peer)
    bounds = [sum(pp[:i]) for i in range(len(pp) + 1)]
    replicas = []
    for old in keep:
        by_id = {p.peer: p for p in free}
        fits = (len(replicas) < int(shape.get("replicas", 1)) and len(old) == len(hc)
                and len({s.peer for s in old}) == len(old)
                and all(s.peer in by_id and s.tp == hc[i] and by_id[s.peer].tp_capacity(cfg) >= s.tp
                        and (s.layer_start, s.layer_end) == (bounds[i], bounds[i + 1]) for i, s in enumerate(old)))
        if fits:
            replicas.append(list(old))
            free = [p for p in free if p.peer not in {s.peer for s in old}]
    while len(replicas) < int(shape.get("replicas", 1)):
        chosen: dict[int, PeerView] = {}
        for si in sorted(range(len(hc)), key=lambda i: -hc[i]):
            # best fit: the smallest peer that can hold the stage, so bigger peers stay for wider stages
            fits = [p for p in free if p.tp_capacity(cfg) >= hc[si] and p not in chosen.values()]
            pick = min(fits, key=lambda p: (p.tp_capacity(cfg), p.peer), default=None)
            if pick is None:
                break
            chosen[si] = pick
        if len(chosen) < len(hc):
            break
        free = [p for p in free if p not in chosen.values()]
        start, stages = 0, []
        for si, (tp, n) in enumerate(zip(hc, pp)):
            stages.append(StageAssignment(chosen[si].peer, tp, start, start + n))
            start += n
        replicas.append(stages)
    return replicas


def proportional_layout(cfg: LlamaConfig, peers: list[PeerView]) -> list[list[StageAssignment]]:
    """One pipeline over all peers, each at its full TP, layers in proportion to memory."""
    peers = sorted(peers, key=lambda p: p.peer)[: cfg.num_hidden_layers]
    weights = [max(p.memory_gib, 1e-6) for p in peers]
    n = cfg.num_hidden_layers
    shares = [max(1, int(n * w / sum(weights))) for w in weights]
    while sum(shares) > n:
        shares[shares.index(max(shares))] -= 1
    shares[-1] += n - sum(shares)
    start, stages = 0, []
    for p, k in zip(peers, shares):
        stages.append(StageAssignment(p.peer, p.tp_capacity(cfg), start, start + k))
        start += k
    return [stages]


def scheduler_layout(cfg: LlamaConfig, peers: list[PeerView], seed: int = 0) -> tuple[list[list[StageAssignment]], dict]:
    """The HexGen scheduler's plan on the live view; raises UserError when it finds none."""
    from hexswarm.serve import plan_bridge

    return plan_bridge.plan_from_view(cfg, peers, seed)


def make_layout(cfg: LlamaConfig, peers: list[PeerView], shape: dict | None, seed: int = 0,
                keep: list[list[StageAssignment]] = ()) -> tuple[list[list[StageAssignment]], dict]:
    if shape:
        replicas = pinned_layout(cfg, peers, shape, keep)
        if not replicas:
            raise UserError(f"no peers fit the pinned layout {shape}")
        return replicas, {"source": "pinned"}
    try:
        return scheduler_layout(cfg, peers, seed)
    except (UserError, ImportError) as e:
        log.warning("scheduler found no plan (%s); using one proportional pipeline", e)
        return proportional_layout(cfg, peers), {"source": "proportional"}

"""Feed the HexGen scheduler (hexswarm.plan) from the live peer table.

Inventories give each peer's devices (memory GiB, TFLOP/s, memory GB/s);
every node's records carry its measured RTT and throughput to the peers it
probes, and the engine's measured step times on its device (calibration),
which the cost model uses in place of its analytic guesses; a pair nobody
measured yet gets a conservative default link.
"""

from __future__ import annotations

from hexswarm.model.config import LlamaConfig
from hexswarm.plan.cluster import GIB, cluster_from_peer_table
from hexswarm.plan.model_spec import ModelSpec
from hexswarm.plan.planner import PlanOptions, plan_cluster
from hexswarm.serve.layout import StageAssignment

DEFAULT_LINK = {"rtt_s": 2e-3, "bandwidth_Bps": 1e9}
# The swarm re-plans on every view change: a short search is enough for a few peers.
SWARM_PLAN_OPTIONS = PlanOptions(final_requests=400)


def _links(peers) -> dict[tuple[str, str], dict]:
    out: dict[tuple[str, str], dict] = {}
    for p in peers:
        for other, link in p.links.items():
            rtt_ms = link.get("rtt_ms")
            if rtt_ms is None:
                continue
            mbps = link.get("mbps")
            out[(p.peer, other)] = {
                "rtt_s": max(float(rtt_ms) / 1000.0, 1e-6),
                "bandwidth_Bps": float(mbps) * 1e6 / 8 if mbps else DEFAULT_LINK["bandwidth_Bps"],
            }
    return out


def _device(d: dict, calibration: dict) -> dict:
    """One inventory device as the planner's peer-table entry; the peer's calibration goes to the
    devices it was measured on (same device name)."""
    name = d.get("name") or d.get("kind")
    out = {"kind": name, "memory_bytes": float(d["memory_gib"]) * GIB, "tflops": float(d["tflops"]),
           "mem_bw": float(d["mem_bw_gbs"]) * 1e9}
    if calibration and calibration.get("device", name) in ("", name):
        out["calibration"] = calibration
    return out


def plan_from_view(cfg: LlamaConfig, peers, seed: int = 0) -> tuple[list[list[StageAssignment]], dict]:
    table = {p.peer: {"devices": [_device(d, getattr(p, "calibration", None) or {}) for d in p.devices]} for p in peers}
    cluster = cluster_from_peer_table(table, _links(peers), name="swarm", default_link=DEFAULT_LINK)
    plan = plan_cluster(cluster, ModelSpec.from_config(cfg, name="swarm-model"), seed=seed, options=SWARM_PLAN_OPTIONS)
    replicas = [[StageAssignment(s.host, s.tp, s.layer_start, s.layer_end, tuple(s.gpus)) for s in r.stages]
                for r in plan.replicas]
    # max_batch: the KV slots per replica the plan assumes (the serving layer may adopt it as its max_batch)
    predicted = {"source": "scheduler", "replica_latency_s": [r.latency_s for r in plan.replicas],
                 "max_batch": plan.workload.max_batch, **plan.predicted.to_json()}
    return replicas, predicted

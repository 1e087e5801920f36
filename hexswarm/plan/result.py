"""The plan a search returns, and its JSON form (what ``hexswarm plan --json`` prints)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hexswarm.plan.cluster import GIB, Cluster
from hexswarm.plan.replica import ReplicaLayout
from hexswarm.plan.batching_sim import BatchSimResult
from hexswarm.plan.workload import Workload


@dataclass(frozen=True)
class StagePlacement:
    host: str
    gpu_kind: str
    gpus: tuple[int, ...]  # device ordinals on the host
    tp: int
    layer_start: int
    layer_end: int
    memory_bytes: int  # peak on the busiest GPU of the stage
    memory_capacity_bytes: int
    stage_time_s: float  # prefill + all decode steps of one request on this stage
    prefill_s: float
    decode_step_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "gpu_kind": self.gpu_kind,
            "gpus": list(self.gpus),
            "tp": self.tp,
            "layers": [self.layer_start, self.layer_end],
            "memory_bytes": self.memory_bytes,
            "memory_gib": round(self.memory_bytes / GIB, 2),
            "memory_capacity_gib": round(self.memory_capacity_bytes / GIB, 2),
            "stage_time_s": round(self.stage_time_s, 6),
            "prefill_s": round(self.prefill_s, 6),
            "decode_step_s": round(self.decode_step_s, 6),
        }


@dataclass(frozen=True)
class ReplicaPlacement:
    stages: tuple[StagePlacement, ...]
    latency_s: float  # unloaded, one request
    bottleneck_s: float
    capacity_rps: float  # with every KV slot busy

    @property
    def hetero_config(self) -> list[int]:
        return [s.tp for s in self.stages]

    @property
    def pp_partition(self) -> list[int]:
        return [s.layer_end - s.layer_start for s in self.stages]

    @property
    def is_symmetric(self) -> bool:
        p = self.pp_partition
        return len(set(self.hetero_config)) == 1 and max(p) - min(p) <= 1

    def to_json(self) -> dict[str, Any]:
        return {
            "stages": [s.to_json() for s in self.stages],
            "hetero_config": self.hetero_config,
            "pp_partition": self.pp_partition,
            "predicted": {
                "unloaded_latency_s": round(self.latency_s, 6),
                "bottleneck_stage_s": round(self.bottleneck_s, 6),
                "capacity_rps": round(self.capacity_rps, 6),
            },
        }


@dataclass(frozen=True)
class Plan:
    model: str
    cluster: str
    seed: int
    workload: Workload
    replicas: tuple[ReplicaPlacement, ...]
    layouts: tuple[ReplicaLayout, ...]  # the same replicas as the cost model sees them
    unused_gpus: tuple[tuple[str, str, tuple[int, ...]], ...]  # (host, kind, ordinals)
    predicted: BatchSimResult  # step-level continuous batching
    candidates_scored: int

    def to_json(self) -> dict[str, Any]:
        w = self.workload
        return {
            "model": self.model,
            "cluster": self.cluster,
            "seed": self.seed,
            "workload": {
                "rate_rps": w.rate,
                "slo_s": w.slo_s,
                "prompt_len": [w.prompt.low, w.prompt.high],
                "output_len": [w.output.low, w.output.high],
                "max_batch": w.max_batch,
            },
            "replicas": [r.to_json() for r in self.replicas],
            "unused_gpus": [{"host": h, "gpu_kind": k, "gpus": list(g)} for h, k, g in self.unused_gpus],
            "predicted": {"rate_rps": w.rate, "slo_s": w.slo_s, **self.predicted.to_json(),
                          "candidates_scored": self.candidates_scored},
        }


def place(cluster: Cluster, layouts: list[ReplicaLayout]) -> tuple[list[ReplicaPlacement], list[tuple[str, str, tuple[int, ...]]]]:
    """Give every stage concrete device ordinals (lowest free first) and list the GPUs left over."""
    free = {(h, k): list(host.gpu_indices(k)) for h, host in enumerate(cluster.hosts) for k in host.kind_counts()}
    out = []
    for lay in layouts:
        stages = []
        for s in lay.stages:
            pool = free[(s.host, s.kind)]
            gpus, free[(s.host, s.kind)] = tuple(pool[: s.tp]), pool[s.tp:]
            host = cluster.hosts[s.host]
            stages.append(StagePlacement(
                host.name, s.kind, gpus, s.tp, s.layer_start, s.layer_end, s.cost.memory_bytes,
                host.kind(s.kind).memory_bytes, s.busy_s, s.cost.prefill_s, s.cost.decode_s,
            ))
        out.append(ReplicaPlacement(tuple(stages), lay.latency_s, lay.bottleneck_s, lay.capacity_rps))
    unused = [(cluster.hosts[h].name, k, tuple(p)) for (h, k), p in sorted(free.items()) if p]
    return out, unused

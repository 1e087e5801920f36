"""The hardware the planner places a model on: hosts with GPUs, and the
latency/bandwidth between every pair of hosts.

Built from plain dicts (``cluster_from_peer_table``, what the swarm feeds from
its live peer table) or from a YAML file (``load_cluster_yaml``, see
``node_configs/clusters/``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from hexswarm.errors import UserError
from hexswarm.plan.calibration import Calibration, CalibrationError, parse_calibration

GIB = 1 << 30


@dataclass(frozen=True)
class GpuKind:
    """One GPU model: memory, dense fp16 tensor throughput, memory bandwidth, and
    optionally the engine's measured speed on it for the planned model."""

    name: str
    memory_bytes: int
    tflops: float  # dense fp16 TFLOP/s
    mem_bw_Bps: float  # bytes/s
    calibration: Calibration | None = None  # measured by the node itself (see plan/calibration.py)


# Datasheet numbers (dense fp16 tensor with fp32 accumulate; HBM/GDDR bandwidth).
GPU_CATALOG: dict[str, GpuKind] = {
    k.name: k
    for k in (
        GpuKind("H100", 80 * GIB, 989.0, 3.35e12),
        GpuKind("H200", 140 * GIB, 989.0, 4.8e12),  # H100 SXM compute, HBM3e (NVIDIA: 141 GB, 4.8 TB/s)
        GpuKind("A100-80G", 80 * GIB, 312.0, 2.04e12),
        GpuKind("A100-40G", 40 * GIB, 312.0, 1.56e12),
        GpuKind("L40S", 48 * GIB, 362.0, 0.864e12),
        GpuKind("A40", 48 * GIB, 149.7, 0.696e12),
        GpuKind("A6000", 48 * GIB, 154.8, 0.768e12),
        GpuKind("A5000", 24 * GIB, 111.1, 0.768e12),
        GpuKind("A4000", 16 * GIB, 76.7, 0.448e12),
        GpuKind("RTX3090", 24 * GIB, 71.0, 0.936e12),
        GpuKind("RTX4090", 24 * GIB, 165.2, 1.008e12),
        GpuKind("V100", 32 * GIB, 125.0, 0.9e12),
        GpuKind("T4", 16 * GIB, 65.0, 0.32e12),
    )
}


@dataclass(frozen=True)
class Link:
    latency_s: float
    bandwidth_Bps: float

    def transfer_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


DEFAULT_INTRA_HOST = Link(5e-6, 25e9)  # PCIe 4.0 x16 peer-to-peer


@dataclass(frozen=True)
class Host:
    name: str
    gpus: tuple[GpuKind, ...]
    region: str = "default"
    intra: Link = DEFAULT_INTRA_HOST  # GPU-to-GPU link inside the host (TP all-reduce, stage hops)

    def kind_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.gpus:
            out[g.name] = out.get(g.name, 0) + 1
        return out

    def kind(self, name: str) -> GpuKind:
        for g in self.gpus:
            if g.name == name:
                return g
        raise KeyError(name)

    def gpu_indices(self, kind: str) -> list[int]:
        return [i for i, g in enumerate(self.gpus) if g.name == kind]


@dataclass(frozen=True)
class Cluster:
    hosts: tuple[Host, ...]
    latency_s: tuple[tuple[float, ...], ...]  # host x host; diagonal unused (intra link)
    bandwidth_Bps: tuple[tuple[float, ...], ...]
    name: str = "cluster"
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.hosts)
        if not n:
            raise UserError("the cluster has no hosts")
        if len(self.latency_s) != n or any(len(r) != n for r in self.latency_s):
            raise UserError(f"latency matrix must be {n}x{n}")
        if len(self.bandwidth_Bps) != n or any(len(r) != n for r in self.bandwidth_Bps):
            raise UserError(f"bandwidth matrix must be {n}x{n}")
        names = [h.name for h in self.hosts]
        if len(set(names)) != n:
            raise UserError("host names must be unique")
        for i in range(n):
            for j in range(n):
                if i != j and (self.bandwidth_Bps[i][j] <= 0 or self.latency_s[i][j] < 0):
                    raise UserError(f"link {names[i]} -> {names[j]} needs latency >= 0 and bandwidth > 0")
        self._index.update({h: i for i, h in enumerate(names)})

    def link(self, a: int, b: int) -> Link:
        if a == b:
            return self.hosts[a].intra
        return Link(self.latency_s[a][b], self.bandwidth_Bps[a][b])

    def host_index(self, name: str) -> int:
        return self._index[name]

    @property
    def num_gpus(self) -> int:
        return sum(len(h.gpus) for h in self.hosts)

    @property
    def total_memory_bytes(self) -> int:
        return sum(g.memory_bytes for h in self.hosts for g in h.gpus)

    def kinds(self) -> dict[str, GpuKind]:
        return {g.name: g for h in self.hosts for g in h.gpus}


def _gpu_from_dict(d: Mapping[str, Any], where: str) -> GpuKind:
    try:
        return GpuKind(
            name=str(d["kind"]),
            memory_bytes=int(d["memory_bytes"]),
            tflops=float(d["tflops"]),
            mem_bw_Bps=float(d["mem_bw"]),
            calibration=parse_calibration(d["calibration"]) if d.get("calibration") else None,
        )
    except CalibrationError as e:
        raise UserError(f"{where}: bad calibration: {e}") from None
    except KeyError as e:
        raise UserError(f"{where}: device lacks {e.args[0]!r} (need kind, memory_bytes, tflops, mem_bw)") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: bad device entry {dict(d)!r}: {e}") from None


def cluster_from_peer_table(
    peers: Mapping[str, Mapping[str, Any]],
    links: Mapping[tuple[str, str], Mapping[str, float]],
    *,
    name: str = "swarm",
    default_link: Mapping[str, float] | None = None,
) -> Cluster:
    """Build a ``Cluster`` from plain dicts, as the swarm holds them in its peer table.

    ``peers`` maps a peer id (the host name in the plan) to::

        {"devices": [{"kind": "A6000", "memory_bytes": 51539607552,
                      "tflops": 154.8, "mem_bw": 768e9}, ...],   # one entry per GPU
         "region": "eu-west",                 # optional, default "default"
         # a device may carry "calibration": the engine's measured speed (plan/calibration.py)
         "intra": {"rtt_s": 1e-5, "bandwidth_Bps": 25e9}}     # optional GPU-GPU link inside the peer

    ``tflops`` is dense fp16 TFLOP/s, ``mem_bw`` bytes/s. ``links`` maps a pair of
    peer ids ``(a, b)`` to ``{"rtt_s": ..., "bandwidth_Bps": ...}``; one direction
    suffices (the other is taken as equal); the one-way latency used by the cost
    model is ``rtt_s / 2``. A missing pair uses ``default_link`` or is an error.
    Peers are ordered by id so that every peer builds the same cluster."""
    ids = sorted(peers)
    hosts = []
    for pid in ids:
        p = peers[pid]
        devices = p.get("devices") or []
        if not devices:
            raise UserError(f"peer {pid} lists no devices")
        gpus = tuple(_gpu_from_dict(d, f"peer {pid}") for d in devices)
        intra = p.get("intra")
        hosts.append(
            Host(
                name=pid,
                gpus=gpus,
                region=str(p.get("region", "default")),
                intra=Link(float(intra["rtt_s"]) / 2, float(intra["bandwidth_Bps"])) if intra else DEFAULT_INTRA_HOST,
            )
        )
    n = len(ids)
    lat = [[0.0] * n for _ in range(n)]
    bw = [[0.0] * n for _ in range(n)]
    for i, a in enumerate(ids):
        for j, b in enumerate(ids):
            if i == j:
                bw[i][j] = hosts[i].intra.bandwidth_Bps
                continue
            entry = links.get((a, b)) or links.get((b, a)) or default_link
            if entry is None:
                raise UserError(f"no measured link between peers {a} and {b}")
            lat[i][j] = float(entry["rtt_s"]) / 2
            bw[i][j] = float(entry["bandwidth_Bps"])
    return Cluster(tuple(hosts), tuple(map(tuple, lat)), tuple(map(tuple, bw)), name=name)


def cluster_from_hosts(
    hosts: Sequence[Host],
    region_links: Mapping[tuple[str, str], Link],
    *,
    intra_region: Link,
    inter_region: Link,
    name: str = "cluster",
    overrides: Mapping[tuple[str, str], Link] | None = None,
) -> Cluster:
    """Fill the host matrix from per-region-pair links (falling back to intra/inter-region defaults)."""
    n = len(hosts)
    lat = [[0.0] * n for _ in range(n)]
    bw = [[0.0] * n for _ in range(n)]
    overrides = overrides or {}
    for i, a in enumerate(hosts):
        for j, b in enumerate(hosts):
            if i == j:
                link = a.intra
            else:
                link = (
                    overrides.get((a.name, b.name))
                    or overrides.get((b.name, a.name))
                    or region_links.get((a.region, b.region))
                    or region_links.get((b.region, a.region))
                    or (intra_region if a.region == b.region else inter_region)
                )
            lat[i][j] = link.latency_s
            bw[i][j] = link.bandwidth_Bps
    return Cluster(tuple(hosts), tuple(map(tuple, lat)), tuple(map(tuple, bw)), name=name)

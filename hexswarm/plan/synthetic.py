"""Synthetic heterogeneous clusters of any size, for scaling benchmarks and tests."""

from __future__ import annotations

import random

from hexswarm.plan.cluster import GPU_CATALOG, Cluster, Host, Link, cluster_from_hosts

SYNTHETIC_KINDS = ("A100-80G", "A6000", "A5000", "RTX3090", "A4000")


def synthetic_cluster(num_gpus: int, seed: int = 0, hosts_per_region: int = 8) -> Cluster:
    """Hosts of 8 (sometimes 4) same-kind GPUs, ``hosts_per_region`` hosts per region;
    0.5 ms / 10 Gbit/s inside a region, 10 ms / 1 Gbit/s between regions."""
    rng = random.Random(seed)
    hosts: list[Host] = []
    left = num_gpus
    while left > 0:
        size = min(left, 8 if rng.random() < 0.75 else 4)
        kind = GPU_CATALOG[rng.choice(SYNTHETIC_KINDS)]
        region = f"r{len(hosts) // hosts_per_region}"
        hosts.append(Host(f"h{len(hosts):04d}", (kind,) * size, region=region))
        left -= size
    return cluster_from_hosts(hosts, {}, intra_region=Link(0.5e-3, 1.25e9), inter_region=Link(10e-3, 0.125e9),
                              name=f"synthetic-{num_gpus}")

"""Seed groupings for the outer search: k-means over the hosts' rows of the
latency matrix (hosts close to the same hosts land together: regions), k by the
elbow rule, then each region packed into groups just big enough for a replica."""

from __future__ import annotations

import random

import numpy as np

from hexswarm.plan.cluster import Cluster


def kmeans(points: np.ndarray, k: int, rng: random.Random, iters: int = 50) -> tuple[list[int], float]:
    """Labels and within-cluster sum of squares; k-means++ seeding from ``rng``."""
    n = len(points)
    centers = [points[rng.randrange(n)]]
    while len(centers) < k:
        d2 = np.min([((points - c) ** 2).sum(axis=1) for c in centers], axis=0)
        total = float(d2.sum())
        if total <= 0:
            centers.append(points[rng.randrange(n)])
            continue
        r, acc = rng.random() * total, 0.0
        for i, w in enumerate(d2):
            acc += float(w)
            if acc >= r:
                centers.append(points[i])
                break
        else:
            centers.append(points[n - 1])
    c = np.array(centers, dtype=float)
    labels = np.zeros(n, dtype=int)
    for _ in range(iters):
        dist = ((points[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
        new = dist.argmin(axis=1)
        if _ and (new == labels).all():
            break
        labels = new
        for j in range(k):
            if (labels == j).any():
                c[j] = points[labels == j].mean(axis=0)
    sse = float(((points - c[labels]) ** 2).sum())
    return [int(x) for x in labels], sse


def latency_regions(cluster: Cluster, rng: random.Random, max_k: int = 8) -> list[list[int]]:
    """Hosts grouped by their latency profile; k = the elbow of the SSE curve."""
    n = len(cluster.hosts)
    if n == 1:
        return [[0]]
    lat = np.array(cluster.latency_s, dtype=float)
    # log scale: a 0.5 ms vs 10 ms split matters more than 10 vs 10.25 ms
    points = np.log10(lat + 1e-6)
    results = []
    for k in range(1, min(max_k, n) + 1):
        results.append(kmeans(points, k, rng))
    sse = [r[1] for r in results]
    k_best = len(results)
    for k in range(1, len(results)):
        # elbow: stop once one more cluster removes less than 10% of the original spread
        if sse[0] <= 0 or (sse[k - 1] - sse[k]) < 0.1 * sse[0]:
            k_best = k
            break
    labels = results[k_best - 1][0]
    regions: dict[int, list[int]] = {}
    for h, lab in enumerate(labels):
        regions.setdefault(lab, []).append(h)
    return sorted(regions.values())

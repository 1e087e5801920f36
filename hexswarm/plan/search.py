"""Outer search: a genetic algorithm over partitions of all GPUs into replica
groups. Mutations merge two groups, split one, or move GPUs between groups;
every group is laid out by the inner DP (``ReplicaPlanner``), and a partition's
fitness is the simulated SLO attainment of its replicas (ties: lower mean
latency). Elitist (mu + lambda) selection, deterministic for a seed."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from hexswarm.plan.cluster import Cluster
from hexswarm.plan.replica import Group, make_group

Partition = tuple[Group, ...]
Fitness = tuple[float, ...]
Counts = dict[tuple[int, str], int]


def canonical(groups: list[Counts]) -> Partition:
    return tuple(sorted(make_group(g) for g in groups if sum(g.values()) > 0))


def _counts(group: Group) -> Counts:
    return {(h, k): n for h, k, n in group}


@dataclass(frozen=True)
class GaSettings:
    population: int = 12
    offspring: int = 24
    generations: int = 40
    patience: int = 8  # stop after this many generations without a better best


class Mutator:
    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.cluster, self.rng = cluster, rng

    def _distance(self, a: Counts, b: Counts) -> float:
        ha = {h for h, _ in a}
        hb = {h for h, _ in b}
        return min(self.cluster.latency_s[x][y] if x != y else 0.0 for x in ha for y in hb)

    def _partner(self, groups: list[Counts], i: int) -> int:
        others = [j for j in range(len(groups)) if j != i]
        if self.rng.random() < 0.7:  # mostly a nearby group: keeps replicas region-local
            return min(others, key=lambda j: (self._distance(groups[i], groups[j]), j))
        return self.rng.choice(others)

    def merge(self, groups: list[Counts]) -> list[Counts]:
        if len(groups) < 2:
            return groups
        i = self.rng.randrange(len(groups))
        j = self._partner(groups, i)
        merged = dict(groups[i])
        for key, n in groups[j].items():
            merged[key] = merged.get(key, 0) + n
        return [g for k, g in enumerate(groups) if k not in (i, j)] + [merged]

    def split(self, groups: list[Counts]) -> list[Counts]:
        big = [i for i, g in enumerate(groups) if sum(g.values()) >= 2]
        if not big:
            return groups
        i = self.rng.choice(big)
        g = groups[i]
        hosts = sorted({h for h, _ in g})
        if len(hosts) >= 2:
            cut = self.rng.randrange(1, len(hosts))
            left = {key: n for key, n in g.items() if key[0] in hosts[:cut]}
        else:
            left = {}
            items = sorted(g.items())
            key, n = self.rng.choice(items)
            if n >= 2:
                left[key] = n // 2 if self.rng.random() < 0.5 else self.rng.randint(1, n - 1)
            for other, m in items:  # other kinds on the host go to one side at random
                if other != key and self.rng.random() < 0.5:
                    left[other] = m
            if not left:
                return groups
        right = {key: n - left.get(key, 0) for key, n in g.items() if n - left.get(key, 0) > 0}
        if not right:
            return groups
        return [x for k, x in enumerate(groups) if k != i] + [left, right]

    def move(self, groups: list[Counts]) -> list[Counts]:
        i = self.rng.randrange(len(groups))
        src = dict(groups[i])
        key = self.rng.choice(sorted(src))
        k = self.rng.randint(1, src[key])
        src[key] -= k
        out = [g for j, g in enumerate(groups) if j != i]
        if len(groups) < 2 or self.rng.random() < 0.2:
            out.append({key: k})
        else:
            j = self._partner(groups, i)
            j = j if j < i else j - 1
            dst = dict(out[j])
            dst[key] = dst.get(key, 0) + k
            out[j] = dst
        return out + [src]

    def mutate(self, part: Partition) -> Partition:
        groups = [_counts(g) for g in part]
        for _ in range(1 + (self.rng.random() < 0.3)):
            op = self.rng.choice((self.merge, self.split, self.move, self.move))
            groups = [{key: n for key, n in g.items() if n > 0} for g in op(groups)]
            groups = [g for g in groups if g]
        return canonical(groups)


def genetic_search(
    seeds: list[Partition],
    fitness: Callable[[Partition], Fitness],
    mutator: Mutator,
    settings: GaSettings,
) -> tuple[Partition, Fitness, int]:
    """Best partition, its fitness, and the number of distinct partitions scored."""
    rng = mutator.rng
    cache: dict[Partition, Fitness] = {}

    def score(p: Partition) -> Fitness:
        if p not in cache:
            cache[p] = fitness(p)
        return cache[p]

    pop = list(dict.fromkeys(seeds))
    while len(pop) < settings.population:
        pop.append(mutator.mutate(pop[rng.randrange(len(pop))]))
    pop = _select(pop, score, settings.population)
    best, stale = pop[0], 0
    for _ in range(settings.generations):
        children = []
        for _ in range(settings.offspring):
            a, b = rng.sample(pop, 2) if len(pop) > 1 else (pop[0], pop[0])
            parent = a if (score(a), a) >= (score(b), b) else b  # binary tournament
            children.append(mutator.mutate(parent))
        pop = _select(pop + children, score, settings.population)
        if score(pop[0]) > score(best):
            best, stale = pop[0], 0
        else:
            stale += 1
            if stale >= settings.patience:
                break
    return best, score(best), len(cache)


def _select(candidates: list[Partition], score: Callable[[Partition], Fitness], k: int) -> list[Partition]:
    unique = list(dict.fromkeys(candidates))
    return sorted(unique, key=lambda p: (score(p), p), reverse=True)[:k]

"""Inner search: the best pipeline for one replica's GPU set.

A group is a multiset of (host, GPU kind, count). Stages are TP groups of one
kind on one host. The search

1. orders the hosts as a cycle of minimum hop cost (each decode step goes
   around the pipeline and the sampled token back to stage 0), tries each
   rotation (which host holds the embedding / the lm_head);
2. pass 1, a DP over (stages, layers) with max-combine: the smallest possible
   bottleneck stage time B* (the replica's throughput under load), choosing per
   (host, kind) how to split its GPUs into TP degrees and how many consecutive
   layers each stage takes, under the per-GPU memory limit;
3. pass 2, the same DP with sum-combine over stages whose time is <= B*(1+slack):
   the lowest unloaded latency among (near-)bottleneck-optimal layouts.

GPUs may be left unused when adding them cannot help (e.g. a slow GPU that
would become the bottleneck even with one layer).
``symmetric=True`` restricts layouts to one TP degree and an even layer split
(HexGen's symmetric baseline)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from hexswarm.plan.cluster import Cluster
from hexswarm.plan.cost import CostModel, HopCost, StageCost, request_latency_s
from hexswarm.plan.layer_dp import INF, Table, best_of, combine, empty, leaf

Group = tuple[tuple[int, str, int], ...]  # sorted (host index, kind, count)
MAX_STAGE_COUNT_TRIES = 2  # DP runs per group at different micro-batch sizes


def make_group(counts: dict[tuple[int, str], int]) -> Group:
    return tuple(sorted((h, k, c) for (h, k), c in counts.items() if c > 0))


@dataclass(frozen=True)
class PlannedStage:
    host: int
    kind: str
    tp: int
    layer_start: int
    layer_end: int
    cost: StageCost
    busy_s: float  # (prefill + decode_steps * decode) at micro-batch rows / rows: stage time per request

    @property
    def layers(self) -> int:
        return self.layer_end - self.layer_start


@dataclass(frozen=True)
class ReplicaLayout:
    stages: tuple[PlannedStage, ...]
    hops: tuple[HopCost, ...]
    token_return_s: float
    latency_s: float  # unloaded end-to-end time of one request (alone: batch 1)
    bottleneck_s: float  # max stage busy time per request at full batch: 1/throughput of the pipeline (req/s)
    max_batch: int = 1  # requests the replica holds at once (KV slots)

    @property
    def capacity_rps(self) -> float:
        """Requests/s when every slot is busy: the bottleneck stage's rate, unless too few slots keep
        the stages busy (max_batch requests per unloaded latency at most)."""
        return min(1.0 / max(self.bottleneck_s, 1e-12), self.max_batch / max(self.latency_s, 1e-12))

    @property
    def hetero_config(self) -> list[int]:
        return [s.tp for s in self.stages]

    @property
    def pp_partition(self) -> list[int]:
        return [s.layers for s in self.stages]

    @property
    def num_gpus(self) -> int:
        return sum(s.tp for s in self.stages)

    def is_symmetric(self) -> bool:
        return len(set(self.hetero_config)) == 1 and max(self.pp_partition) - min(self.pp_partition) <= 1

    def gpu_counts(self) -> dict[tuple[int, str], int]:
        out: dict[tuple[int, str], int] = {}
        for s in self.stages:
            out[(s.host, s.kind)] = out.get((s.host, s.kind), 0) + s.tp
        return out


@dataclass(frozen=True)
class _Unit:
    host: int
    kind: str
    tp: int
    first: bool
    last: bool
    rows: int = 1  # micro-batch rows a step of this stage carries (max_batch / stages)


def micro_batch_rows(max_batch: int, stages: int) -> int:
    """Rows per step: the replica's slots are spread over one micro-batch per stage (as the runtime does),
    so each stage reads its weights once per micro-batch: deeper pipelines do not batch more."""
    return max(1, -(-max_batch // max(1, stages)))


class ReplicaPlanner:
    def __init__(self, cluster: Cluster, cost: CostModel, *, batch: int = 1, symmetric: bool = False,
                 slack: float = 0.05, max_rotations: int = 8, quick: bool = False) -> None:
        self.cluster = cluster
        self.cost = cost
        self.batch = batch
        self.quick = quick  # one DP per group at one stage per block (for rough capacity estimates)
        self.symmetric = symmetric
        self.slack = slack
        self.max_rotations = max_rotations
        self.L = cost.model.num_layers
        self.degrees = [d for d in (1, 2, 3, 4, 6, 8, 16) if cost.model.valid_tp(d)]
        self._curves: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._memo: dict[Group, ReplicaLayout | None] = {}
        self._stage_costs: dict[tuple, StageCost] = {}
        self._units: dict[tuple, Table] = {}
        self._plains: dict[tuple, list[Table]] = {}
        self._blocks: dict[tuple, Table] = {}
        self._cycles: dict[tuple[int, ...], list[int]] = {}
        self._limits: dict[tuple[_Unit, float], int] = {}

    def stage_cost(self, host: int, kind: str, tp: int, layers: int, first: bool, last: bool, batch: int | None = None) -> StageCost:
        """Stage time at ``batch`` rows (default: the replica's max_batch); memory always for max_batch slots."""
        h = self.cluster.hosts[host]
        batch = self.batch if batch is None else batch
        key = (h.kind(kind), h.intra, tp, layers, first, last, batch)  # the kind itself: calibrations differ per device
        if key not in self._stage_costs:
            self._stage_costs[key] = self.cost.stage(h.kind(kind), tp, layers, h.intra, first=first, last=last, batch=batch)
        return self._stage_costs[key]

    # ---- per-stage curves over layer counts ----

    def curve(self, u: _Unit) -> tuple[np.ndarray, np.ndarray]:
        """(busy time per request at full batch, fits in memory) for l = 0..L layers on this TP unit."""
        host = self.cluster.hosts[u.host]
        kind = host.kind(u.kind)
        key = (kind, host.intra, u.tp, u.first, u.last, u.rows)
        if key not in self._curves:
            # Stage time and memory are affine in the layer count (per-layer terms plus the ends and the
            # reserve): two costed points give the whole curve, checked against the full stage.
            steps = self.cost.decode_steps
            one, two, full = (self.stage_cost(u.host, u.kind, u.tp, l, u.first, u.last, batch=u.rows) for l in (1, 2, self.L))
            layers = np.arange(self.L + 1, dtype=float)
            b1, b2 = one.busy_s(steps), two.busy_s(steps)
            busy = (b1 + (layers - 1) * (b2 - b1)) / u.rows
            memory = one.memory_bytes + (layers - 1) * (two.memory_bytes - one.memory_bytes)
            assert abs(busy[self.L] * u.rows - full.busy_s(steps)) <= 1e-9 * max(1.0, full.busy_s(steps)), "non-affine stage cost"
            busy[0] = INF
            fits = memory <= kind.memory_bytes
            fits[0] = False
            self._curves[key] = (busy, fits)
        return self._curves[key]

    def _limit(self, u: _Unit, bound: float) -> int:
        """The most layers this unit may take: it must fit and stay within ``bound``. Busy time grows and
        the memory headroom shrinks with the layers, so the allowed layer counts are exactly 1..limit."""
        key = (u, bound)
        limit = self._limits.get(key)
        if limit is None:
            busy, fits = self.curve(u)
            limit = self._limits[key] = int(np.count_nonzero(fits & (busy <= bound)))
        return limit

    def _unit_table(self, u: _Unit, op: str, bound: float) -> Table:
        limit = self._limit(u, bound)
        key = (u, op, limit)  # by limit, not bound: groups with different bounds share tables
        if key not in self._units:
            busy, _ = self.curve(u)
            values = np.full(self.L + 1, INF)
            # sum: the hop into the stage is charged, so that extra stages are not free
            values[1:limit + 1] = busy[1:limit + 1] + (self._intra_hop(u) if op == "sum" else 0.0)
            self._units[key] = leaf(values, u)
        return self._units[key]

    def _intra_hop(self, u: _Unit) -> float:
        intra = self.cluster.hosts[u.host].intra
        h = self.cost.hop(intra, u.tp, intra, batch=u.rows)
        return (h.prefill_s + self.cost.decode_steps * h.decode_s) / u.rows

    # ---- block = all GPUs of one kind on one host in this group ----

    def _block(self, host: int, kind: str, n: int, first: bool, last: bool, op: str, bound: float, rows: int) -> Table:
        # The same host block recurs in many groups the search scores (and in every rotation). A table
        # depends on the bound only through its units' layer limits, so it is keyed by those.
        ends = [(e, h) for e, h in ((True, True), (True, False), (False, True)) if (e or h) and (e <= first and h <= last)]
        limits = tuple(self._limit(_Unit(host, kind, d, e, h, rows), bound) for d in self.degrees if d <= n for e, h in ends)
        key = (host, kind, n, first, last, op, rows, self._plain_limits(host, kind, bound, rows), limits)
        table = self._blocks.get(key)
        if table is None:
            table = self._blocks[key] = self._block_table(host, kind, n, first, last, op, bound, rows)
        return table

    def _plain_limits(self, host: int, kind: str, bound: float, rows: int) -> tuple[int, ...]:
        return tuple(self._limit(_Unit(host, kind, d, False, False, rows), bound) for d in self.degrees)

    def _plain(self, host: int, kind: str, n: int, op: str, bound: float, rows: int) -> list[Table]:
        """plain[g] for g = 0..n: the best use of at most g GPUs of the block, no embedding/lm_head."""
        plain = self._plains.setdefault((host, kind, op, rows, self._plain_limits(host, kind, bound, rows)), [empty(self.L)])
        for g in range(len(plain), n + 1):
            opts = [plain[g - 1]] + [combine(plain[g - d], self._unit_table(_Unit(host, kind, d, False, False, rows), op, bound), op)
                                     for d in self.degrees if d <= g]
            plain.append(best_of(opts))
        return plain

    def _block_table(self, host: int, kind: str, n: int, first: bool, last: bool, op: str, bound: float, rows: int) -> Table:
        degrees = [d for d in self.degrees if d <= n]

        def unit(d: int, holds_embedding: bool, holds_head: bool) -> Table:
            return self._unit_table(_Unit(host, kind, d, holds_embedding, holds_head, rows), op, bound)

        plain = self._plain(host, kind, n, op, bound, rows)
        if not first and not last:
            return plain[n]
        if first and last:  # a one-block replica: one stage holds both ends, or two stages do
            opts = [combine(unit(d, True, True), plain[n - d], op) for d in degrees]
            opts += [combine(combine(unit(d1, True, False), plain[n - d1 - d2], op), unit(d2, False, True), op)
                     for d1 in degrees for d2 in degrees if d1 + d2 <= n]
        elif first:
            opts = [combine(unit(d, True, False), plain[n - d], op) for d in degrees]
        else:
            opts = [combine(plain[n - d], unit(d, False, True), op) for d in degrees]
        return best_of(opts)

    def _chain(self, blocks: list[tuple[int, str, int]], op: str, bound: float, rows: int) -> Table:
        table: Table | None = None
        for i, (h, k, n) in enumerate(blocks):
            t = self._block(h, k, n, i == 0, i == len(blocks) - 1, op, bound, rows)
            table = t if table is None else combine(table, t, op)
        assert table is not None
        return table

    # ---- host order ----

    def _hop_weight(self, a: int, b: int) -> float:
        h = self.cost.hop(self.cluster.link(a, b), 1, self.cluster.hosts[b].intra, batch=self.batch)
        return (h.prefill_s + self.cost.decode_steps * (h.decode_s + self.cluster.link(a, b).latency_s)) / self.batch

    def host_cycle(self, hosts: list[int]) -> list[int]:
        """Hosts in a cycle of small total hop cost (exact up to 7 hosts, else nearest neighbour + 2-opt).
        Cached per host set: the search meets the same hosts in many groups."""
        key = tuple(hosts)
        if key not in self._cycles:
            self._cycles[key] = self._host_cycle(list(hosts))
        return list(self._cycles[key])

    def _host_cycle(self, hosts: list[int]) -> list[int]:
        if len(hosts) <= 2:
            return hosts
        n = len(hosts)
        w = np.array([[self._hop_weight(a, b) if a != b else 0.0 for b in hosts] for a in hosts])
        if n <= 7:  # every order with hosts[0] first, costed at once; argmin keeps the first minimum
            perms = np.array([(0,) + p for p in itertools.permutations(range(1, n))])
            costs = w[perms, np.roll(perms, -1, axis=1)].sum(axis=1)
            return [hosts[i] for i in perms[int(np.argmin(costs))]]
        order = [0]
        rest = list(range(1, n))
        while rest:
            nxt = min(rest, key=lambda b: (w[order[-1], b], hosts[b]))
            order.append(nxt)
            rest.remove(nxt)

        def cycle_cost(o: list[int]) -> float:
            idx = np.array(o)
            return float(w[idx, np.roll(idx, -1)].sum())

        cost = cycle_cost(order)
        improved = True
        while improved:
            improved = False
            for i in range(1, n - 1):
                for j in range(i + 1, n):
                    cand = order[:i] + order[i:j + 1][::-1] + order[j + 1:]
                    c = cycle_cost(cand)
                    if c < cost - 1e-12:
                        order, cost, improved = cand, c, True
        return [hosts[i] for i in order]

    def _rotations(self, group: Group) -> list[list[tuple[int, str, int]]]:
        by_host: dict[int, list[tuple[int, str, int]]] = {}
        for h, k, n in group:
            by_host.setdefault(h, []).append((h, k, n))
        cycle = self.host_cycle(sorted(by_host))
        step = max(1, len(cycle) // self.max_rotations)
        out = []
        for r in range(0, len(cycle), step)[: self.max_rotations]:
            order = cycle[r:] + cycle[:r]
            out.append([b for h in order for b in by_host[h]])
        return out

    # ---- results ----

    def best(self, group: Group) -> ReplicaLayout | None:
        """The best layout for this GPU set, or None if the model cannot fit on it."""
        if group not in self._memo:
            self._memo[group] = self._symmetric(group) if self.symmetric else self._asymmetric(group)
        return self._memo[group]

    def _asymmetric(self, group: Group) -> ReplicaLayout | None:
        """A stage's time per request depends on the micro-batch, max_batch / stages rows, so on the stage
        count the DP is choosing. Start from one stage per block; then (unless ``quick``) rerun at the stage
        count found (or, if that is where it started, at half of it: fewer, wider stages batch more rows per
        weight read). Two DPs per group keep planning time bounded. Every candidate is costed at its real
        stage count and the best is kept."""
        rotations = self._rotations(group)
        tried: set[int] = set()
        best: ReplicaLayout | None = None
        count = len(rotations[0])
        while True:
            rows = micro_batch_rows(self.batch, count)
            if rows in tried:
                break
            tried.add(rows)
            lay = self._asymmetric_at(rotations, rows)
            improved = lay is not None and (best is None or (lay.bottleneck_s, lay.latency_s) < (best.bottleneck_s, best.latency_s))
            if improved:
                best = lay
            if self.quick or self.batch == 1 or best is None:
                break
            if len(tried) == MAX_STAGE_COUNT_TRIES:
                break
            found = len(best.stages)
            # the DP's own answer costed at its real micro-batch, else fewer, wider stages
            count = found if micro_batch_rows(self.batch, found) not in tried else max(1, found // 2)
        return best

    def _asymmetric_at(self, rotations: list[list[tuple[int, str, int]]], rows: int) -> ReplicaLayout | None:
        best_rot, best_b = None, INF
        for blocks in rotations:
            b = float(self._chain(blocks, "max", INF, rows).values[self.L])
            if b < best_b:
                best_rot, best_b = blocks, b
        if best_rot is None:
            return None
        table = self._chain(best_rot, "sum", best_b * (1 + self.slack) + 1e-12, rows)
        if not np.isfinite(table.values[self.L]):
            return None
        return self.layout([(u.host, u.kind, u.tp, l) for u, l in table.assignment(self.L)])

    def _symmetric(self, group: Group) -> ReplicaLayout | None:
        best: ReplicaLayout | None = None
        for blocks in self._rotations(group):
            for d in self.degrees:
                units = [(h, k) for h, k, n in blocks for _ in range(n // d)]
                for count in range(1, min(len(units), self.L) + 1):
                    for chosen in self._symmetric_choices(units, d, count):
                        lay = self.layout([(h, k, d, l) for (h, k), l in zip(chosen, _even_split(self.L, count))])
                        if lay is not None and (best is None or (lay.bottleneck_s, lay.latency_s) < (best.bottleneck_s, best.latency_s)):
                            best = lay
        return best

    def _symmetric_choices(self, units: list[tuple[int, str]], d: int, count: int):
        """All units if they are `count`; else the `count` fastest per layer (keeping pipeline order)."""
        if count == len(units):
            yield units
            return
        speed = {}
        for h, k in set(units):
            busy, _ = self.curve(_Unit(h, k, d, False, False, micro_batch_rows(self.batch, count)))
            speed[(h, k)] = busy[1]
        ranked = sorted(range(len(units)), key=lambda i: (speed[units[i]], i))[:count]
        yield [units[i] for i in sorted(ranked)]

    def layout(self, stages: list[tuple[int, str, int, int]]) -> ReplicaLayout | None:
        """Cost a given pipeline [(host, kind, tp, layers), ...]; None if a GPU runs out of memory.
        Stage costs are at a micro-batch (max_batch / stages rows: throughput); the latency is of one
        request alone."""
        if not stages or sum(s[3] for s in stages) != self.L or any(s[3] < 1 for s in stages):
            return None
        out, alone, start = [], [], 0
        steps = self.cost.decode_steps
        rows = micro_batch_rows(self.batch, len(stages))
        for i, (h, k, d, l) in enumerate(stages):
            first, last = i == 0, i == len(stages) - 1
            c = self.stage_cost(h, k, d, l, first, last, batch=rows)
            if c.memory_bytes > self.cluster.hosts[h].kind(k).memory_bytes:
                return None
            out.append(PlannedStage(h, k, d, start, start + l, c, c.busy_s(steps) / rows))
            alone.append(self.stage_cost(h, k, d, l, first, last, batch=1))
            start += l

        def hops_at(batch: int) -> tuple[HopCost, ...]:
            return tuple(self.cost.hop(self.cluster.link(a.host, b.host), b.tp, self.cluster.hosts[b.host].intra, batch=batch)
                         for a, b in zip(out, out[1:]))

        hops = hops_at(rows)
        ret = self.cost.token_return(self.cluster.link(out[-1].host, out[0].host), batch=rows)
        ret_alone = self.cost.token_return(self.cluster.link(out[-1].host, out[0].host), batch=1)
        latency = request_latency_s(self.cost, alone, list(hops_at(1)), ret_alone)
        return ReplicaLayout(tuple(out), hops, ret, latency, max(s.busy_s for s in out), self.batch)


def _even_split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]

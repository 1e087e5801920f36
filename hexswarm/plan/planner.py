"""Plan a cluster: feasibility check, seeds, genetic search, final simulation.

    plan_cluster(cluster, model, rate=None, slo_s=None, seed=0) -> Plan

``max_batch`` (the requests a replica holds: its KV slots) is chosen unless the
options fix it: the smallest power of two whose first-seed capacity serves the
rate at <= 30% load, else the one past which capacity stops growing (memory
runs out or decode turns compute-bound).
``rate`` defaults to 70% of the estimated capacity (sum of 1/bottleneck) of the
first seed grouping at that max_batch, ``slo_s`` to twice the median unloaded
latency of its replicas; all three are reported in the plan. The search scores
candidates with a closed-form queueing estimate (``queueing``); the final
plan's prediction comes from the step-level continuous-batching simulator
(``batching_sim``)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hexswarm.errors import UserError
from hexswarm.plan.cluster import GIB, Cluster
from hexswarm.plan.cost import CostModel, RooflineCostModel
from hexswarm.plan.grouping import latency_regions
from hexswarm.plan.model_spec import ModelSpec
from hexswarm.plan.replica import ReplicaLayout, ReplicaPlanner
from hexswarm.plan.result import Plan, place
from hexswarm.plan.search import Counts, GaSettings, Mutator, Partition, canonical, genetic_search
from hexswarm.plan.batching_sim import simulate_batching
from hexswarm.plan.queueing import estimate
from hexswarm.plan.workload import LengthDist, Workload

DEFAULT_RATE_SHARE = 0.7
DEFAULT_SLO_SCALE = 2.0
SEED_HEADROOMS = (1.15, 1.5, 2.0, 3.0)  # group memory / one replica's memory, for the packed seeds
MAX_BATCH_CHOICES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CAPACITY_GAIN = 1.1  # a doubled max_batch must add 10% capacity to be worth its KV memory and latency
BATCH_CHOICE_LOAD = 0.3  # choose max_batch so the rate is at most 30% of the capacity: waits for a slot stay rare


@dataclass(frozen=True)
class PlanOptions:
    prompt: LengthDist = LengthDist.constant(32)
    output: LengthDist = LengthDist.constant(128)
    max_batch: int | None = None  # KV slots per replica (requests held at once); None: the planner chooses
    final_requests: int = 1000  # simulated for the chosen plan's prediction (more with many replicas)
    ga: GaSettings = field(default_factory=GaSettings)
    symmetric: bool = False  # HexGen's symmetric baseline: one TP degree and an even split per replica


def replica_memory_bytes(model: ModelSpec, cost: RooflineCostModel) -> int:
    """Lower bound on one replica's memory: all weights, the KV cache of its slots, one reserve."""
    kv = model.num_layers * cost.max_batch * cost.max_context * model.kv_bytes_per_token_per_layer(1)
    return model.weight_bytes + kv + cost.reserved_bytes


def check_fits(cluster: Cluster, model: ModelSpec, cost: RooflineCostModel) -> None:
    need = replica_memory_bytes(model, cost)
    usable = sum(max(0, g.memory_bytes - cost.reserved_bytes) for h in cluster.hosts for g in h.gpus) + cost.reserved_bytes
    if need > usable:
        raise UserError(
            f"{model.name} does not fit: one replica needs at least {need / GIB:.1f} GiB of GPU memory "
            f"(weights {model.weight_bytes / GIB:.1f} GiB + KV cache + runtime reserve) but the cluster's "
            f"{cluster.num_gpus} GPUs have {usable / GIB:.1f} GiB usable: {(need - usable) / GIB:.1f} GiB missing"
        )


def _inventory(cluster: Cluster) -> list[tuple[int, str, int]]:
    return [(h, k, n) for h, host in enumerate(cluster.hosts) for k, n in sorted(host.kind_counts().items())]


def packed_seed(cluster: Cluster, regions: list[list[int]], need: int, headroom: float, degrees: list[int]) -> Partition:
    """Each region's GPUs packed, host by host, into groups of about ``headroom`` x one replica's memory."""
    target = need * headroom
    groups: list[Counts] = []
    for region in regions:
        region_groups: list[Counts] = []
        cur: Counts = {}
        mem = 0
        for h in region:
            host = cluster.hosts[h]
            for kind, count in sorted(host.kind_counts().items()):
                per = host.kind(kind).memory_bytes
                # chunk = the smallest TP-friendly count of this kind that holds a replica alone, else all
                chunk = next((d for d in degrees if d <= count and d * per >= target), count)
                left = count
                while left:
                    take = min(chunk, left)
                    cur[(h, kind)] = cur.get((h, kind), 0) + take
                    mem += take * per
                    left -= take
                    if mem >= target:
                        region_groups.append(cur)
                        cur, mem = {}, 0
        if cur:
            if region_groups:  # too small alone: join the region's last group
                for key, n in cur.items():
                    region_groups[-1][key] = region_groups[-1].get(key, 0) + n
            else:
                region_groups.append(cur)
        groups += region_groups
    return canonical(groups)


class Planner:
    def __init__(self, cluster: Cluster, model: ModelSpec, options: PlanOptions = PlanOptions(), *,
                 cost: CostModel | None = None) -> None:
        self.cluster, self.model, self.options = cluster, model, options
        shape = Workload(1.0, 1.0, options.prompt, options.output, options.max_batch or 1)
        self.base_cost = cost or RooflineCostModel.for_workload(model, shape)
        if isinstance(self.base_cost, RooflineCostModel):
            check_fits(cluster, model, self.base_cost)
        self._replica_planners: dict[int, ReplicaPlanner] = {}
        self.use_max_batch(options.max_batch or 1)

    def use_max_batch(self, max_batch: int) -> None:
        """Cost and lay out replicas that hold ``max_batch`` requests each."""
        self.max_batch = max_batch
        self.cost = self.base_cost.with_max_batch(max_batch) if isinstance(self.base_cost, RooflineCostModel) else self.base_cost
        if max_batch not in self._replica_planners:  # kept: the choice of max_batch tries several
            self._replica_planners[max_batch] = ReplicaPlanner(self.cluster, self.cost, batch=max_batch,
                                                               symmetric=self.options.symmetric)
        self.replicas = self._replica_planners[max_batch]

    def choose_max_batch(self, seed_part: Partition, rate: float | None) -> int:
        """The smallest max_batch whose capacity on ``seed_part`` carries ``rate`` at 30% load; without
        a rate (or when none does) the smallest within CAPACITY_GAIN of the best that fits in memory."""
        capacities: dict[int, float] = {}
        for b in MAX_BATCH_CHOICES:
            cost = self.base_cost.with_max_batch(b)
            rough = ReplicaPlanner(self.cluster, cost, batch=b, symmetric=self.options.symmetric, quick=True)
            capacities[b] = sum(lay.capacity_rps for g in seed_part if (lay := rough.best(g)) is not None)
            if rate is not None and BATCH_CHOICE_LOAD * capacities[b] >= rate:
                return b
            if capacities[b] < max(capacities.values()) / CAPACITY_GAIN:
                break  # the KV cache now takes memory the layers need
        top = max(capacities.values())
        return min(b for b, c in capacities.items() if c * CAPACITY_GAIN >= top)

    def layouts(self, part: Partition) -> list[ReplicaLayout]:
        return [lay for g in part if (lay := self.replicas.best(g)) is not None]

    def seeds(self, rng: random.Random) -> list[Partition]:
        regions = latency_regions(self.cluster, rng)
        need = replica_memory_bytes(self.model, self.cost) if isinstance(self.cost, RooflineCostModel) else self.model.weight_bytes
        degrees = self.replicas.degrees
        out = [packed_seed(self.cluster, regions, need, f, degrees) for f in SEED_HEADROOMS]
        whole_regions = canonical([{(h, k): n for h, k, n in _inventory(self.cluster) if h in r} for r in regions])
        out.append(whole_regions)
        if self.cluster.num_gpus <= 64:
            out.append(canonical([{(h, k): n for h, k, n in _inventory(self.cluster)}]))
        return list(dict.fromkeys(out))

    def default_workload(self, seed_part: Partition) -> tuple[float, float]:
        lays = self.layouts(seed_part)
        if not lays:
            return 1.0, 1.0
        rate = DEFAULT_RATE_SHARE * sum(lay.capacity_rps for lay in lays)
        latencies = sorted(lay.latency_s for lay in lays)
        return rate, DEFAULT_SLO_SCALE * latencies[len(latencies) // 2]

    def fitness(self, part: Partition, workload: Workload) -> tuple[float, float]:
        """(SLO attainment, -mean latency) from the closed-form queueing estimate; -1 when nothing fits."""
        lays = self.layouts(part)
        if not lays:
            return (-1.0, 0.0)
        e = estimate(lays, self.max_batch, workload.rate, workload.slo_s)
        return (e.slo_attainment, -e.mean_s)

    def predict(self, part: Partition, workload: Workload, seed: int):
        """Step-level continuous-batching prediction of the chosen plan."""
        lays = self.layouts(part)
        n = max(self.options.final_requests, 100 * len(lays))
        work = Workload(workload.rate, workload.slo_s, workload.prompt, workload.output, workload.max_batch, n)
        return simulate_batching(self.cluster, self.cost, lays, work, seed=seed)

    def plan(self, *, rate: float | None = None, slo_s: float | None = None, seed: int = 0) -> Plan:
        rng = random.Random(seed)
        seeds = self.seeds(rng)
        feasible = [s for s in seeds if self.layouts(s)]
        if not feasible:
            self._raise_no_layout()
        o = self.options
        if o.max_batch is None and isinstance(self.base_cost, RooflineCostModel):
            self.use_max_batch(self.choose_max_batch(feasible[0], rate))
        d_rate, d_slo = self.default_workload(feasible[0])
        workload = Workload(d_rate if rate is None else rate, d_slo if slo_s is None else slo_s, o.prompt, o.output,
                            self.max_batch)

        best, _, scored = genetic_search(seeds, lambda part: self.fitness(part, workload), Mutator(self.cluster, rng), o.ga)
        lays = self.layouts(best)
        placements, unused = place(self.cluster, lays)
        return Plan(self.model.name, self.cluster.name, seed, workload, tuple(placements), tuple(lays), tuple(unused),
                    self.predict(best, workload, seed), scored)

    def _raise_no_layout(self) -> None:
        biggest = max(g.memory_bytes for h in self.cluster.hosts for g in h.gpus)
        layer = self.model.params_per_layer * self.model.bytes_per_param
        raise UserError(
            f"{self.model.name}: no pipeline layout fits although the total memory would: TP groups stay inside one host "
            f"and one GPU kind, one layer is {layer / GIB:.2f} GiB unsharded, the largest GPU has {biggest / GIB:.1f} GiB; "
            f"add GPUs to the hosts or use a smaller model"
        )


def plan_cluster(cluster: Cluster, model: ModelSpec, *, rate: float | None = None, slo_s: float | None = None,
                 seed: int = 0, options: PlanOptions = PlanOptions()) -> Plan:
    """Plan ``model`` on ``cluster`` (see module docstring for defaults)."""
    return Planner(cluster, model, options).plan(rate=rate, slo_s=slo_s, seed=seed)

"""Fast (fluid) serving simulator: Poisson arrivals over a set of replica pipelines. The search
scores candidates with it; ``batching_sim`` is the step-level one that checks the final plan.

Model (per replica):
* a request (or, with batching, a micro-batch of up to ``max_batch / slots``
  queued requests: ``max_batch`` is what the replica holds in all) takes one of
  the replica's pipeline slots; there are as many slots
  as stages (at most ``cost.max_inflight``, whose KV caches the memory model
  reserves), so up to one micro-batch per stage is in flight;
* a micro-batch makes one prefill pass, then one decode pass per generated token;
  a pass alone takes T = sum of stage times + hops; passes of concurrent
  micro-batches interleave, and each stage serves one at a time, so with
  concurrent micro-batches a pass takes max(T, sum over active micro-batches of
  their bottleneck-stage time). Progress is fluid between events, so the event
  count is a few per request, not one per token;
* requests queue FIFO per replica; the dispatcher sends each arrival to the
  replica with the smallest expected completion (work in system x bottleneck +
  unloaded latency).
Stage and hop times come from the cost model with each request's own lengths."""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Callable

from hexswarm.plan.cluster import Cluster
from hexswarm.plan.cost import CostModel
from hexswarm.plan.replica import ReplicaLayout
from hexswarm.plan.workload import Workload


@dataclass(frozen=True)
class SimResult:
    slo_attainment: float
    p50_s: float
    p99_s: float
    mean_s: float
    throughput_rps: float
    num_requests: int

    def to_json(self) -> dict:
        return {
            "slo_attainment": round(self.slo_attainment, 4),
            "p50_latency_s": round(self.p50_s, 4),
            "p99_latency_s": round(self.p99_s, 4),
            "mean_latency_s": round(self.mean_s, 4),
            "throughput_rps": round(self.throughput_rps, 4),
            "simulated_requests": self.num_requests,
        }


@dataclass(frozen=True)
class PassTimes:
    """One micro-batch on one replica: (alone, bottleneck-stage) time of a prefill pass and of a decode pass."""

    prefill_alone: float
    prefill_bottleneck: float
    decode_alone: float
    decode_bottleneck: float


class ReplicaTiming:
    """Pass times of a replica for given batch size and lengths, from the cost model (cached)."""

    def __init__(self, cluster: Cluster, cost: CostModel, layout: ReplicaLayout) -> None:
        self.cluster, self.cost, self.layout = cluster, cost, layout
        self._cache: dict[tuple[int, int, int], PassTimes] = {}

    def times(self, batch: int, prompt_len: int, output_len: int) -> PassTimes:
        key = (batch, prompt_len, output_len)
        if key not in self._cache:
            cost = self.cost.with_lengths(prompt_len, output_len)
            stages = []
            for i, s in enumerate(self.layout.stages):
                host = self.cluster.hosts[s.host]
                stages.append(cost.stage(host.kind(s.kind), s.tp, s.layers, host.intra,
                                         first=i == 0, last=i == len(self.layout.stages) - 1, batch=batch))
            st = self.layout.stages
            hops = [cost.hop(self.cluster.link(a.host, b.host), b.tp, self.cluster.hosts[b.host].intra, batch=batch)
                    for a, b in zip(st, st[1:])]
            ret = cost.token_return(self.cluster.link(st[-1].host, st[0].host), batch=batch) if len(st) > 1 else 0.0
            self._cache[key] = PassTimes(
                sum(s.prefill_s for s in stages) + sum(h.prefill_s for h in hops),
                max(s.prefill_s for s in stages),
                sum(s.decode_s for s in stages) + sum(h.decode_s for h in hops) + ret,
                max(s.decode_s for s in stages),
            )
        return self._cache[key]


@dataclass
class _Batch:
    times: PassTimes
    top: float  # decode passes of the longest request in the micro-batch
    finish_at: list[tuple[float, int]]  # (decode passes left when the request is done, id); largest last
    remaining: float = 1.0  # passes left in the current phase; phase 0 = the prefill pass
    phase: int = 0

    def alone(self) -> float:
        return self.times.prefill_alone if self.phase == 0 else self.times.decode_alone

    def bottleneck(self) -> float:
        return self.times.prefill_bottleneck if self.phase == 0 else self.times.decode_bottleneck

    def target(self) -> float:
        """Passes left in the current phase at which this micro-batch next changes."""
        return 0.0 if self.phase == 0 else self.finish_at[-1][0]


@dataclass
class _Replica:
    timing: ReplicaTiming
    slots: int
    micro_batch: int  # requests per micro-batch: the replica's max_batch KV slots shared by its slots
    queue: list[int] = field(default_factory=list)
    active: list[_Batch] = field(default_factory=list)
    last_update: float = 0.0
    version: int = 0
    in_system: int = 0
    due: "_Batch | None" = None  # the micro-batch whose change the scheduled event is for

    def rates(self) -> list[float]:
        """Passes per second of each active micro-batch (they share every stage)."""
        shared = sum(b.bottleneck() for b in self.active)
        return [1.0 / max(b.alone(), shared) for b in self.active]

    def advance(self, now: float) -> None:
        dt = now - self.last_update
        if dt > 0:
            for b, r in zip(self.active, self.rates()):
                b.remaining -= dt * r
        self.last_update = now


_EPS = 1e-9


def simulate(cluster: Cluster, cost: CostModel, replicas: list[ReplicaLayout], workload: Workload, *, seed: int = 0) -> SimResult:
    """Serve ``workload.num_requests`` Poisson arrivals on the replicas; deterministic for a seed."""
    if not replicas:
        return SimResult(0.0, math.inf, math.inf, math.inf, 0.0, 0)
    rng = random.Random(seed)
    n = workload.num_requests
    arrivals, prompts, outputs = [], [], []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(workload.rate)
        arrivals.append(t)
        prompts.append(workload.prompt.sample(rng))
        outputs.append(workload.output.sample(rng))
    done = [math.inf] * n
    reps = []
    for r in replicas:
        slots = min(len(r.stages), cost.max_inflight)
        reps.append(_Replica(ReplicaTiming(cluster, cost, r), slots=slots, micro_batch=max(1, -(-workload.max_batch // slots))))
    unloaded = [r.latency_s for r in replicas]
    bottleneck = [max(r.bottleneck_s, 1e-12) for r in replicas]
    events: list[tuple[float, int, int]] = []  # (time, replica, version): the replica's next change

    def settle(i: int, now: float) -> None:
        """Close finished phases and requests, start queued work, schedule the replica's next change."""
        rep = reps[i]
        for b in list(rep.active):
            if b.phase == 0 and b.remaining <= _EPS:
                b.phase, b.remaining = 1, b.top
            if b.phase == 1:
                while b.finish_at and b.remaining <= b.finish_at[-1][0] + _EPS:
                    done[b.finish_at.pop()[1]] = now
                    rep.in_system -= 1
                if not b.finish_at:
                    rep.active.remove(b)
        while rep.queue and len(rep.active) < rep.slots:
            take = rep.queue[: rep.micro_batch]
            del rep.queue[: len(take)]
            times = rep.timing.times(len(take), max(prompts[r] for r in take), max(outputs[r] for r in take))
            steps = {r: max(0, outputs[r] - 1) for r in take}  # the prefill pass yields the first token
            top = float(max(steps.values()))
            finish_at = sorted(((top - steps[r], r) for r in take), key=lambda x: (x[0], -x[1]))
            rep.active.append(_Batch(times, top, finish_at))
        rep.version += 1
        if rep.active:
            nxt, k = min(((b.remaining - b.target()) / r, k) for k, (b, r) in enumerate(zip(rep.active, rep.rates())))
            rep.due = rep.active[k]
            heapq.heappush(events, (now + max(nxt, 0.0), i, rep.version))

    def run_events(until: float) -> None:
        while events and events[0][0] <= until:
            te, i, ver = heapq.heappop(events)
            rep = reps[i]
            if ver == rep.version:
                rep.advance(te)
                if rep.due is not None:  # snap: rounding of large clock values must not stall the phase
                    rep.due.remaining = min(rep.due.remaining, rep.due.target())
                settle(i, te)

    for rid in range(n):
        now = arrivals[rid]
        run_events(now)
        best = min(range(len(reps)), key=lambda i: ((reps[i].in_system + 1) * bottleneck[i] + unloaded[i], i))
        rep = reps[best]
        rep.advance(now)
        rep.queue.append(rid)
        rep.in_system += 1
        settle(best, now)
    run_events(math.inf)
    lat = sorted(done[r] - arrivals[r] for r in range(n))
    met = sum(1 for x in lat if x <= workload.slo_s)
    span = max(done) - arrivals[0]
    return SimResult(
        slo_attainment=met / n,
        p50_s=_quantile(lat, 0.5),
        p99_s=_quantile(lat, 0.99),
        mean_s=sum(lat) / n,
        throughput_rps=n / span if span > 0 else 0.0,
        num_requests=n,
    )


def _quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def highest_rate(attainment: Callable[[float], float], start: float, target: float, rel_tol: float) -> float:
    """Bisection for the highest rate whose ``attainment(rate)`` is >= ``target`` (0 if none above 1e-9)."""
    def ok(rate: float) -> bool:
        return attainment(rate) >= target

    lo, hi = 0.0, start
    for _ in range(40):
        if not ok(hi):
            break
        lo, hi = hi, hi * 2
    if lo == 0.0:
        lo = hi
        while lo > 1e-9 and not ok(lo):
            hi, lo = lo, lo / 2
        if lo <= 1e-9:
            return 0.0
    while hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def peak_rate(cluster: Cluster, cost: CostModel, replicas: list[ReplicaLayout], workload: Workload, *,
              target: float = 0.9, seed: int = 0, rel_tol: float = 0.02) -> float:
    """The highest Poisson rate at which SLO attainment stays >= ``target`` (fluid model)."""
    def attainment(rate: float) -> float:
        return simulate(cluster, cost, replicas, workload.with_rate(rate), seed=seed).slo_attainment

    return highest_rate(attainment, workload.rate, target, rel_tol) if replicas else 0.0

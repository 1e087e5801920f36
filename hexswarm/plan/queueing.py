"""Closed-form SLO attainment of a set of replicas: the search's fitness.

The search scores ~1000 partitions; simulating each (even the fluid model)
dominated planning time on large clusters. Here each replica is an M/G/B
queue, which is what continuous batching makes it: ``B`` = max_batch slots,
a request holds a slot for its whole generation, and the replica completes
``mu`` requests per second when every slot is busy (``capacity_rps``: the
bottleneck stage's rate, or ``B / l1`` when too few slots keep the stages
busy). So a slot serves ``mu / B`` requests/s and a request's time in a slot
is ``S(rho) = l1 + rho * (lB - l1)``: the unloaded latency ``l1`` at light
load, the full-batch latency ``lB = B / mu`` at full load.

Arrivals split over replicas in proportion to capacity (what the dispatcher's
join-the-shortest-expected-queue does at steady state). The wait for a slot
follows Erlang C: ``P(W > t) = C * exp(-(B * mu_slot - lambda) t)``, so
``P(T <= slo) = 1 - C * exp(-(mu - lambda)(slo - S))`` for ``slo > S``.
An overloaded replica attains nothing. ``batching_sim`` checks the chosen
plan step by step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hexswarm.plan.replica import ReplicaLayout

OVERLOAD_PENALTY_S = 1e3  # mean latency charged per unit of overload, so that more capacity still ranks higher


@dataclass(frozen=True)
class QueueEstimate:
    slo_attainment: float
    mean_s: float


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits, for ``servers`` slots offered ``offered`` Erlangs (< servers).
    Scalar on purpose: the O(servers) recurrence on one float beats numpy's per-call overhead."""
    blocking = 1.0
    for k in range(1, servers + 1):  # Erlang B recurrence
        blocking = offered * blocking / (k + offered * blocking)
    rho = offered / servers
    return blocking / (1.0 - rho * (1.0 - blocking))


def estimate(replicas: list[ReplicaLayout], max_batch: int, rate: float, slo_s: float) -> QueueEstimate:
    """SLO attainment and mean latency of Poisson ``rate`` over ``replicas`` that hold ``max_batch`` each."""
    if not replicas:
        return QueueEstimate(0.0, math.inf)
    l1 = np.array([r.latency_s for r in replicas])
    lb = np.maximum(l1, max_batch * np.array([r.bottleneck_s for r in replicas]))
    mu = max_batch / lb  # = ReplicaLayout.capacity_rps
    rho = rate / mu.sum()
    if rho >= 1.0:
        return QueueEstimate(0.0, float(l1.mean() + OVERLOAD_PENALTY_S * rho))
    lam = rate * mu / mu.sum()
    wait_p = np.array([erlang_c(max_batch, float(a)) for a in lam * lb])
    service = l1 + rho * (lb - l1)
    spare = mu - lam
    slack = slo_s - service
    attain = np.where(slack > 0, 1.0 - wait_p * np.exp(-spare * np.maximum(slack, 0.0)), 0.0)
    mean = service + wait_p / spare
    share = lam / rate
    return QueueEstimate(float((share * attain).sum()), float((share * mean).sum()))

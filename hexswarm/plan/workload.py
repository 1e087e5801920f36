"""The traffic a plan is judged on: Poisson arrivals, prompt/output lengths, an SLO."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hexswarm.errors import UserError


@dataclass(frozen=True)
class LengthDist:
    """Integer lengths, uniform on [low, high] (constant when low == high)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise UserError(f"length range [{self.low}, {self.high}] must satisfy 1 <= low <= high")

    @classmethod
    def constant(cls, n: int) -> "LengthDist":
        return cls(n, n)

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2

    def sample(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)


@dataclass(frozen=True)
class Workload:
    rate: float  # requests/s, Poisson
    slo_s: float  # end-to-end deadline per request
    prompt: LengthDist = LengthDist.constant(32)  # HexGen's s_in
    output: LengthDist = LengthDist.constant(128)  # HexGen's s_out
    max_batch: int = 1  # sequences per micro-batch; 1 = no batching (as HexGen's runtime)
    num_requests: int = 400  # simulated requests per evaluation

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise UserError(f"--rate must be > 0, got {self.rate}")
        if self.slo_s <= 0:
            raise UserError(f"--slo must be > 0, got {self.slo_s}")
        if self.max_batch < 1:
            raise UserError(f"batch must be >= 1, got {self.max_batch}")

    @property
    def max_context(self) -> int:
        return self.prompt.high + self.output.high

    def with_rate(self, rate: float) -> "Workload":
        return Workload(rate, self.slo_s, self.prompt, self.output, self.max_batch, self.num_requests)

    def with_slo(self, slo_s: float) -> "Workload":
        return Workload(self.rate, slo_s, self.prompt, self.output, self.max_batch, self.num_requests)


def staggered_starts(clients: int, period_s: float) -> list[float]:
    """When each of ``clients`` closed-loop clients sends its first request, spread over one request's
    expected time: client j at j/clients of ``period_s``.  Equal-length requests then stay spread, one
    arrival every period/clients seconds, as independent users' do (the load generator and the simulator
    use the same rule)."""
    return [j * period_s / clients for j in range(clients)]


def think_times(client: int, max_s: float):
    """Client ``client``'s waits after each answer before its next request: uniform on [0, ``max_s``], seeded by
    the client's number (the simulator draws all its clients' waits from one such stream).  With equal-length
    requests and no wait, a closed-loop client's arrivals lock onto one phase of the engine's step cycle, and its
    time to first token is then one of two values a whole step apart, which one set by sub-millisecond latencies
    (bench records of runs 20-21: 18.5 or 24.5 ms at 8 streams); waits of up to one step spread them over the
    cycle, as independent users' are."""
    rng = random.Random(1_000_003 + client)
    while True:
        yield rng.uniform(0.0, max_s) if max_s > 0 else 0.0

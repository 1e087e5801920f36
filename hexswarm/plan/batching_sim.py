"""Step-level simulator of continuous batching over pipelined replicas.

It follows the serving engine's rule, per replica:

* a replica holds at most ``max_batch`` requests (its KV slots); an arriving
  request waits FIFO until a slot is free;
* the replica runs ``micro_batches`` micro-batches (default: one per stage),
  each request belongs to one micro-batch for life;
* each step of a micro-batch carries one decode row per running request of it
  plus a chunk of waiting prompt tokens, bounded by the step token budget
  (chunked prefill); requests are admitted at the start of a step while slots
  and budget are free;
* the step goes through the stages in order; each stage runs one step at a
  time (FIFO), so the micro-batches overlap on different stages; between
  stages the activations cross the link, and the sampled tokens go back from
  the last stage to stage 0 before that micro-batch's next step;
* a stage's step is its GPU time plus the host time the runtime adds to it
  (launch, wait, link hand-off; the node measures it, ``Calibration.stage_overhead``),
  except on a one-stage pipeline, which launches step k+1 before reading
  step k, so its host work hides behind the GPU (``overlap``), and on stages
  that hand over on the GPU (``gpu_handoff``: stage processes sharing one GPU,
  runtime/gpu_handoff.py), whose hosts never wait for the GPU: such a stage
  turns a step in max(GPU time, host time) (``Calibration.stage_host``), and
  its activations never cross a socket;
* a one-stage overlapped pipeline decides a step that would start new prompts
  only when the step on the GPU ends (the engine waits for it then, so that a
  burst is prefilled in fewer, fuller steps; ``StageEngine._new_prompts``),
  if the node's ``gather_prompts`` is on (off by default);
* stages that share one device (``shared_device``: several stage processes on
  one GPU) share its time: their GPU work runs one at a time;
* starts due at the same moment reach stage 0 one by one: an idle engine
  launches a step on the first, the others wait for its next step;
* a request first passes the entry node's event loop (``_Entry``: one job at a
  time, in the order the work comes): ``entry_s`` of work per arriving request
  (front end, tokenizer, dispatch), after which its start goes through the loop
  behind the work queued meanwhile (a closed-loop wave of c requests reaches
  stage 0 together, after c x entry_s); a first token goes out once the work
  queued before it is done, every token relayed costs ``entry_token_s``, and a
  finished request costs ``entry_done_s``; plus
  ``entry_latency_s`` that is not serial (the rest of the way in and the first
  token's way out), which shifts the TTFT.

Step times come from the cost model for the exact step (rows, their contexts,
prompt tokens), so batching, context growth and prefill/decode interference
are all in. Reported as HexGen does (SLO attainment at a deadline on end-to-end
latency), plus time to first token and inter-token latency.

Each step of a micro-batch is pushed through every stage when it starts: since
stages are FIFO and every micro-batch takes the same path, their order never
changes, so a step's stage times are known from the stages' free times."""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from hexswarm.plan.cluster import Cluster
from hexswarm.plan.cost import CostModel, RooflineCostModel, StepShape
from hexswarm.plan.replica import ReplicaLayout
from hexswarm.plan.simulator import SimResult, highest_rate
from hexswarm.plan.workload import Workload, think_times


@dataclass(frozen=True)
class BatchSimResult(SimResult):
    """SimResult plus what a streaming client sees: tokens/s, time to first token, inter-token latency."""

    tokens_per_s: float = 0.0
    ttft_p50_s: float = math.inf
    ttft_p99_s: float = math.inf
    itl_p50_s: float = math.inf  # per request: (last token - first token) / (tokens - 1), median over requests
    itl_p99_s: float = math.inf
    gap_p50_s: float = math.inf  # median over every gap between two tokens of a request (what a benchmark pools)
    ttft_min_s: float = math.inf
    ttft_s: tuple[float, ...] = ()  # per request, in the order they were sent (not in to_json)

    def to_json(self) -> dict:
        return {**super().to_json(), "tokens_per_s": round(self.tokens_per_s, 2),
                "ttft_p50_s": round(self.ttft_p50_s, 5), "ttft_p99_s": round(self.ttft_p99_s, 5),
                "itl_p50_s": round(self.itl_p50_s, 6), "itl_p99_s": round(self.itl_p99_s, 6),
                "gap_p50_s": round(self.gap_p50_s, 6), "ttft_min_s": round(self.ttft_min_s, 5)}


class StepTimer(Protocol):
    """Seconds of one step on each stage, the hop after it, and the token return to stage 0."""

    def stages(self) -> int: ...

    def stage_s(self, i: int, shape: StepShape) -> float: ...  # GPU time

    def overhead_s(self, i: int, shape: StepShape) -> float: ...  # host time the stage adds beyond its GPU time

    def host_s(self, i: int, shape: StepShape) -> float: ...  # the stage's whole host time (hidden by longer GPU work)

    def link_s(self, i: int, shape: StepShape) -> float: ...  # the step's activations over a local socket link

    def hop_s(self, i: int, shape: StepShape) -> float: ...  # from stage i to stage i + 1

    def return_s(self, rows: float) -> float: ...


class RooflineTimer:
    """Exact step shapes through ``RooflineCostModel.step_s``."""

    def __init__(self, cluster: Cluster, cost: RooflineCostModel, layout: ReplicaLayout) -> None:
        self.cost = cost
        st = layout.stages
        hosts = [cluster.hosts[s.host] for s in st]
        self._stages = [cost.step_model(h.kind(s.kind), s.tp, s.layers, h.intra, i == len(st) - 1)
                        for i, (s, h) in enumerate(zip(st, hosts))]
        self._hops = [cost.hop_coefficients(cluster.link(a.host, b.host), b.tp, cluster.hosts[b.host].intra)
                      for a, b in zip(st, st[1:])]
        self._return = cluster.link(st[-1].host, st[0].host) if len(st) > 1 else None
        self._kinds = [h.kind(s.kind) for s, h in zip(st, hosts)]
        self._cal = [k.calibration for k in self._kinds]
        self._token_bytes = cost.model.hidden_size * cost.model.bytes_per_param

    def stages(self) -> int:
        return len(self._stages)

    def stage_s(self, i: int, shape: StepShape) -> float:
        return self._stages[i].seconds(shape)

    def overhead_s(self, i: int, shape: StepShape) -> float:
        """The node's measured per-step host time beyond the GPU's, for this many rows."""
        cal = self._cal[i]
        return 0.0 if cal is None else cal.overhead_s(max(shape.rows_out, 1.0))

    def host_s(self, i: int, shape: StepShape) -> float:
        """The stage's host time per step, GPU time not taken off (``Calibration.stage_host``).  A v2
        record has only the overhead, measured as (step - GPU time of its two 1-layer stages) / 2: the
        GPU half is added back from the same calibration (its 2-layer step with embedding and lm_head)."""
        cal = self._cal[i]
        if cal is None:
            return 0.0
        rows = max(shape.rows_out, 1.0)
        host = cal.host_s(rows)
        if host is not None:
            return host
        if not cal.stage_overhead:
            return 0.0
        kind = self._kinds[i]
        gpu = self.cost.step_model(kind, 1, min(2, self.cost.model.num_layers), None, True).seconds(
            StepShape.decode(rows, cal.context))
        return cal.overhead_s(rows) + gpu / 2

    def link_s(self, i: int, shape: StepShape) -> float:
        """A stage that sends activations on: the prompt chunk's over its local socket link (the
        overhead measurement's decode rows already crossed it)."""
        cal = self._cal[i]
        sends = i < len(self._cal) - 1
        return shape.prefill_tokens * self._token_bytes / cal.link_Bps if cal and cal.link_Bps and sends else 0.0

    def hop_s(self, i: int, shape: StepShape) -> float:
        fixed, per_token = self._hops[i]
        return fixed + per_token * shape.new_tokens

    def return_s(self, rows: float) -> float:
        return 0.0 if self._return is None else self._return.transfer_s(8 * rows)


class PassTimer:
    """Any ``CostModel`` (e.g. the prototype's): a prompt chunk costs its share of the
    whole-prompt prefill pass, decode rows cost a decode step at that batch."""

    def __init__(self, cluster: Cluster, cost: CostModel, layout: ReplicaLayout) -> None:
        self.cluster, self.cost, self.layout = cluster, cost, layout
        self._cache: dict[int, tuple[list, list, float]] = {}

    def _at(self, batch: int):
        if batch not in self._cache:
            st, c = self.layout.stages, self.cost
            stages = [c.stage(self.cluster.hosts[s.host].kind(s.kind), s.tp, s.layers, self.cluster.hosts[s.host].intra,
                              first=i == 0, last=i == len(st) - 1, batch=batch) for i, s in enumerate(st)]
            hops = [c.hop(self.cluster.link(a.host, b.host), b.tp, self.cluster.hosts[b.host].intra, batch=batch)
                    for a, b in zip(st, st[1:])]
            ret = c.token_return(self.cluster.link(st[-1].host, st[0].host), batch=batch) if len(st) > 1 else 0.0
            self._cache[batch] = (stages, hops, ret)
        return self._cache[batch]

    def _prompt_share(self, shape: StepShape) -> float:
        return shape.prefill_tokens / self.cost.prompt_len

    def stages(self) -> int:
        return len(self.layout.stages)

    def stage_s(self, i: int, shape: StepShape) -> float:
        t = self._at(1)[0][i].prefill_s * self._prompt_share(shape) if shape.prefill_tokens else 0.0
        rows = math.ceil(shape.decode_rows)
        return t + (self._at(rows)[0][i].decode_s if rows else 0.0)

    def overhead_s(self, i: int, shape: StepShape) -> float:
        return 0.0

    host_s = link_s = overhead_s

    def hop_s(self, i: int, shape: StepShape) -> float:
        t = self._at(1)[1][i].prefill_s * self._prompt_share(shape) if shape.prefill_tokens else 0.0
        rows = math.ceil(shape.decode_rows)
        return t + (self._at(rows)[1][i].decode_s if rows else 0.0)

    def return_s(self, rows: float) -> float:
        return self._at(max(1, math.ceil(rows)))[2]


def step_timer(cluster: Cluster, cost: CostModel, layout: ReplicaLayout) -> StepTimer:
    if isinstance(cost, RooflineCostModel):
        return RooflineTimer(cluster, cost, layout)
    return PassTimer(cluster, cost, layout)


@dataclass
class _Request:
    rid: int
    prompt_left: int
    steps_left: int  # decode steps after the prompt (the step that ends the prompt yields the first token)
    context: int = 0  # tokens in its KV cache


@dataclass
class _Replica:
    timer: StepTimer
    max_batch: int
    step_tokens: int
    capacity_rps: float  # rough: for the dispatcher only
    unloaded_s: float
    waiting: deque = field(default_factory=deque)
    members: list[list[_Request]] = field(default_factory=list)  # per micro-batch
    idle: list[bool] = field(default_factory=list)
    free_at: list[float] = field(default_factory=list)  # per stage (its engine)
    device_free_at: list[float] = field(default_factory=list)  # per device (the GPU time the stages on it share)
    device_of: list[int] = field(default_factory=list)  # per stage
    started_at: float = 0.0  # when the last decided step starts (one-stage overlapped pipelines)
    releases: list[float] = field(default_factory=list)  # heap: times slots free up
    running: int = 0
    in_system: int = 0
    done_at: list[float] = field(default_factory=list)  # heap: times requests finish (dispatcher's view)

    def load(self, now: float) -> int:
        while self.done_at and self.done_at[0] <= now:
            heapq.heappop(self.done_at)
            self.in_system -= 1
        return self.in_system


def _capacity(timer: StepTimer, max_batch: int, prompt: float, steps: float) -> tuple[float, float]:
    """(requests/s at full slots, unloaded latency): rough numbers the dispatcher ranks replicas by."""
    S = timer.stages()
    rows = max(1.0, max_batch / S)
    ctx = prompt + steps / 2
    dec = StepShape.decode(rows, ctx)
    stage = [timer.stage_s(i, dec) for i in range(S)]
    alone = sum(stage) + sum(timer.hop_s(i, dec) for i in range(S - 1)) + timer.return_s(rows)
    round_s = max(alone, S * max(stage))
    capacity = rows * S / (round_s * (steps + 1))
    one = StepShape.decode(1, ctx)
    pre = StepShape.prefill(1, prompt)
    unloaded = (sum(timer.stage_s(i, pre) for i in range(S)) + sum(timer.hop_s(i, pre) for i in range(S - 1))
                + steps * (sum(timer.stage_s(i, one) for i in range(S)) + sum(timer.hop_s(i, one) for i in range(S - 1))
                           + timer.return_s(1)))
    return capacity, unloaded


def simulate_batching(cluster: Cluster, cost: CostModel, replicas: list[ReplicaLayout], workload: Workload, *,
                      seed: int = 0, max_batch: int | None = None, step_tokens: int = 2048,
                      closed_loop: int | None = None, micro_batches: int | None = None, shared_device: bool = False,
                      overlap: bool = True, entry_s: float = 0.0, entry_latency_s: float = 0.0,
                      entry_done_s: float = 0.0, gpu_handoff: bool = False,
                      client_starts: list[float] | None = None, gather_prompts: bool = False,
                      entry_token_s: float = 0.0, think_max_s: float = 0.0) -> BatchSimResult:
    """Serve ``workload.num_requests`` requests on the replicas; deterministic for a seed.

    Open loop (default): Poisson arrivals at ``workload.rate``. ``closed_loop=c``: ``c`` clients each
    send a request, and the next one as soon as the answer is complete (a benchmark at concurrency c).
    ``max_batch`` defaults to the workload's; ``step_tokens`` is the per-step token budget;
    ``micro_batches`` defaults to one per stage; ``shared_device``: each replica's stages run on one
    device; ``overlap``: a one-stage pipeline hides its host work behind the GPU (CUDA);
    ``entry_s``, ``entry_done_s``: the entry's serial work (its event loop, one job at a time, in
    the order the work comes): ``entry_s`` per arriving request, ``entry_done_s`` per finished one;
    a request's start reaches its replica once the loop has done the work queued before it, and
    its first token reaches the client likewise (see ``_Entry``); ``entry_latency_s``: seconds
    a request's first token takes beyond that, not serial (the way to stage 0 and the token's way
    back out; it shifts the TTFT, and a closed-loop client's next request when positive);
    ``gpu_handoff``: the stages of a replica share one GPU and hand over on it (with
    ``shared_device``); ``client_starts``: when each closed-loop client sends its first request
    (default: all at 0); ``gather_prompts``: the node setting of that name (off, its default: a one-stage
    overlapped pipeline decides a step with new prompts as early as any other); ``entry_token_s``:
    the entry's serial work per token it relays (a step's tokens reach it in one message: the first
    tokens of the prompts that ended, then the decode rows' tokens); ``think_max_s``: a closed-loop
    client waits uniform [0, think_max_s] after an answer before its next request (workload.think_times)."""
    slots = max_batch or workload.max_batch
    rng = random.Random(seed)
    thinks = think_times(seed, think_max_s)
    n = workload.num_requests
    times: list[float] = [math.inf] * n
    prompts, outputs = [], []
    t = 0.0
    for k in range(n):
        if closed_loop is None:
            t += rng.expovariate(workload.rate)
            times[k] = t
        prompts.append(workload.prompt.sample(rng))
        outputs.append(workload.output.sample(rng))
    if closed_loop is not None:
        firsts = list(client_starts or []) + [0.0] * closed_loop
        times[:closed_loop] = firsts[:min(n, closed_loop)]
    # heap of (time, order, what, request or step): what the entry does (ARRIVE, START, DISPATCH, RELAY)
    pending = [(times[k], k, ARRIVE, k) for k in range(n) if times[k] < math.inf]
    entry = _Entry(entry_s, entry_done_s, entry_token_s)
    queue_order = n
    gaps: list[float] = []
    issued = len(pending)
    if not replicas or n == 0:
        return BatchSimResult(0.0, math.inf, math.inf, math.inf, 0.0, 0)
    steps = [cost.with_lengths(p, o).decode_steps for p, o in zip(prompts, outputs)]
    first = [math.inf] * n  # at stage 0
    seen = [math.inf] * n  # the first token at the client (less entry_latency_s)
    last = [math.inf] * n
    reps: list[_Replica] = []
    for lay in replicas:
        timer = step_timer(cluster, cost, lay)
        cap, unloaded = _capacity(timer, slots, workload.prompt.mean, max(0, round(workload.output.mean) - 1))
        S = timer.stages()
        M = max(1, micro_batches or S)
        reps.append(_Replica(timer, slots, step_tokens, cap, unloaded, members=[[] for _ in range(M)],
                             idle=[True] * M, free_at=[0.0] * S, device_free_at=[0.0] * S,
                             device_of=[0] * S if shared_device else list(range(S))))
    events: list[tuple[float, int, int, int]] = []  # (time, order, replica, micro-batch)
    order = 0

    def wake(r: int, now: float) -> None:
        nonlocal order
        rep = reps[r]
        for m, idle in enumerate(rep.idle):
            if idle:
                rep.idle[m] = False
                order += 1
                heapq.heappush(events, (now, order, r, m))

    def send_next(done_at: float) -> None:
        """A closed-loop client has its answer at ``done_at``: it sends its next request."""
        nonlocal issued, queue_order
        if closed_loop is not None and issued < n:
            times[issued] = done_at + max(entry_latency_s, 0.0) + next(thinks)
            queue_order += 1
            heapq.heappush(pending, (times[issued], queue_order, ARRIVE, issued))
            issued += 1

    def relay(now: float, decoded: int, out: list[tuple[int, bool, bool]]) -> None:
        """A step's tokens at stage 0: `decoded` of its decode rows, and `out` (request, its first
        token, its last) for the rows that start or end a request.  First tokens go out first
        (StageEngine._tokens_back), each once the entry has done the work queued before it, a request
        that ends with its first token followed by its done; then the decode rows' tokens; each
        finished request costs the entry ``entry_done_s``, then its client has the answer."""
        for rid, is_first, is_last in out:
            if is_first:
                seen[rid] = entry.token(now)
                if is_last:
                    send_next(entry.done(now))
        entry.relay(now, decoded)
        for rid, is_first, is_last in out:
            if is_last and not is_first:
                send_next(entry.done(now))

    def launch(r: int, m: int, now: float) -> None:
        nonlocal order, queue_order
        rep = reps[r]
        S = rep.timer.stages()
        handoff = gpu_handoff and shared_device and S > 1
        # Stage 0 still busy: decide the step when it starts.  A one-stage overlapped pipeline decides
        # step k+1 as soon as step k starts (it launches k+1 before reading k's tokens); so, nearly, does
        # stage 0 of stages handing over on the GPU with one micro-batch: it launches k+1 from k's tokens
        # on the device once it has read k-1's (k starts on the GPU) and the last stage has handed k's
        # back (its host has queued its part of k), before k ends on the GPU.
        ahead = overlap and (S == 1 or (handoff and len(rep.members) == 1))
        busy_until = rep.started_at if ahead else rep.free_at[0]
        if ahead and S == 1 and gather_prompts and rep.free_at[0] > now + 1e-15 and _new_prompts(rep, m):
            busy_until = rep.free_at[0]  # the engine waits for the step on the GPU before starting prompts
        if busy_until > now + 1e-15:
            order += 1
            heapq.heappush(events, (busy_until, order, r, m))
            return
        while rep.releases and rep.releases[0] <= now:
            heapq.heappop(rep.releases)
            rep.running -= 1
        mine = rep.members[m]
        budget = rep.step_tokens - sum(1 for q in mine if q.prompt_left == 0)
        share = math.ceil(rep.max_batch / len(rep.members))  # the runtime splits its requests over the micro-batches
        while rep.waiting and rep.running < rep.max_batch and budget > 0 and len(mine) < share:
            rid = rep.waiting.popleft()
            mine.append(_Request(rid, prompts[rid], steps[rid]))
            rep.running += 1
            budget -= 1  # at least one prompt token of it runs in this step
        if not mine:
            rep.idle[m] = True
            if rep.waiting and rep.releases:  # blocked on slots: retry when one frees
                order += 1
                rep.idle[m] = False
                heapq.heappush(events, (rep.releases[0], order, r, m))
            return
        # Compose the step: every decoding row, then prompt chunks in admission order (sums, not objects: hot loop).
        budget = rep.step_tokens
        emitting = [q for q in mine if q.prompt_left == 0]
        rows = len(emitting)
        context = sum(q.context for q in emitting) + rows
        budget -= rows
        chunks: list[tuple[_Request, int]] = []
        prompt_tokens = pairs = written = 0.0
        for q in mine:
            if q.prompt_left > 0 and budget > 0:
                c = min(q.prompt_left, budget)
                budget -= c
                prompt_tokens += c
                pairs += c * q.context + c * c / 2
                written += c + q.context
                chunks.append((q, c))
        shape = StepShape(rows, prompt_tokens, context + pairs, context + written, rows + len(chunks))
        timer = rep.timer
        at = now
        gpu_ready = 0.0  # handing over on the GPU: when the stage before has finished its part there
        for i in range(S):
            gpu = timer.stage_s(i, shape)
            start = max(at, rep.free_at[i])
            if ahead and S == 1:  # step k+1 launched before step k is read: host work under the GPU's
                end = start + max(gpu, timer.host_s(i, shape))
                rep.started_at = start
            else:
                d = rep.device_of[i]
                gpu_start = max(start, rep.device_free_at[d], gpu_ready)
                gpu_end = gpu_start + gpu
                rep.device_free_at[d] = gpu_end
                if ahead and i == 0:
                    rep.started_at = gpu_start  # stage 0 has read step k-1's tokens
                if ahead and i == S - 1:  # ... and k's come back once the last stage has queued its part
                    rep.started_at = max(rep.started_at, start + timer.host_s(i, shape))
                if handoff:  # the host queues its part and hands on without waiting for the GPU: the next
                    # stage's host takes the step while this part still runs (its own GPU part waits for it)
                    end = start + timer.host_s(i, shape)
                    gpu_ready = gpu_end
                else:  # the host waits for its GPU, then does its own work and sends the activations
                    end = gpu_end + timer.overhead_s(i, shape) + timer.link_s(i, shape)
            rep.free_at[i] = end
            at = end + (timer.hop_s(i, shape) if i < S - 1 else 0.0)
        token_t = max(at, gpu_ready)  # handing over on the GPU: the tokens are there once the last part ends
        finished: list[_Request] = []
        out: list[tuple[int, bool, bool]] = []  # (request, first token, last token) in row order
        for q in emitting:
            q.context += 1
            q.steps_left -= 1
            gaps.append(token_t - last[q.rid])
            last[q.rid] = token_t
            if q.steps_left <= 0:
                finished.append(q)
                out.append((q.rid, False, True))
        for q, c in chunks:
            q.prompt_left -= c
            q.context += c
            if q.prompt_left == 0:  # the prompt's last chunk yields the first token
                first[q.rid] = last[q.rid] = token_t
                if q.steps_left <= 0:
                    finished.append(q)
                out.append((q.rid, True, q.steps_left <= 0))
        for q in finished:
            heapq.heappush(rep.releases, token_t)
            heapq.heappush(rep.done_at, token_t)
        if out or entry_token_s > 0:
            if entry.serial:  # the tokens go out through the entry's loop, at token_t
                queue_order += 1
                heapq.heappush(pending, (token_t, queue_order, RELAY, (len(emitting), out)))
            else:
                relay(token_t, len(emitting), out)
        if finished:
            done = {id(q) for q in finished}
            rep.members[m] = [q for q in mine if id(q) not in done]
        order += 1
        heapq.heappush(events, (rep.started_at if ahead else token_t + timer.return_s(len(emitting) + len(chunks)),
                                order, r, m))

    heapq.heapify(pending)
    while pending or events:
        if pending and (not events or pending[0][0] <= events[0][0]):  # the entry first at equal times
            now, _, what, rid = heapq.heappop(pending)
            if what == RELAY:
                relay(now, *rid)
                continue
            if what == ARRIVE and entry.serial:  # through the entry's loop: its work, then the start
                queue_order += 1
                heapq.heappush(pending, (entry.arrive(now), queue_order, START, rid))
                continue
            if what != DISPATCH:
                at = entry.start(now)
                if at > now:  # behind other starts (at once) or work the loop had queued
                    queue_order += 1
                    heapq.heappush(pending, (at, queue_order, DISPATCH, rid))
                    continue
            best = min(range(len(reps)), key=lambda i: ((reps[i].load(now) + 1) / reps[i].capacity_rps + reps[i].unloaded_s, i))
            rep = reps[best]
            rep.waiting.append(rid)
            rep.in_system += 1
            wake(best, now)
        else:
            now, _, r, m = heapq.heappop(events)
            launch(r, m, now)

    if not entry.serial:
        seen = first
    lat = sorted(last[r] - times[r] + entry_latency_s for r in range(n))
    each_ttft = tuple(seen[r] - times[r] + entry_latency_s for r in range(n))
    ttft = sorted(each_ttft)
    itl = sorted((last[r] - first[r]) / steps[r] if steps[r] > 0 else 0.0 for r in range(n))
    span = max(last) + entry_latency_s - min(times)
    tokens = sum(steps) + n
    return BatchSimResult(
        slo_attainment=sum(1 for x in lat if x <= workload.slo_s) / n,
        p50_s=_quantile(lat, 0.5), p99_s=_quantile(lat, 0.99), mean_s=sum(lat) / n,
        throughput_rps=n / span if span > 0 else 0.0,
        tokens_per_s=tokens / span if span > 0 else 0.0,
        ttft_p50_s=_quantile(ttft, 0.5), ttft_p99_s=_quantile(ttft, 0.99),
        itl_p50_s=_quantile(itl, 0.5), itl_p99_s=_quantile(itl, 0.99),
        gap_p50_s=_quantile(sorted(gaps), 0.5) if gaps else 0.0,
        ttft_min_s=ttft[0], ttft_s=each_ttft,
        num_requests=n,
    )


ARRIVE, START, DISPATCH, RELAY = range(4)  # what the entry does with a request (or a step's tokens)
START_GAP_S = 1e-6  # starts due at once reach stage 0 one by one, this far apart


@dataclass
class _Entry:
    """The entry node's event loop, one job at a time in the order the work comes (trio: a task that
    awaits resumes behind the tasks already runnable).  A request costs it ``arrive_s`` (HTTP, tokenizer,
    dispatch); its start then goes through the loop once more, behind the work queued meanwhile (so a
    closed-loop wave's starts reach stage 0 together, once the whole wave is in); a token goes out once
    the work queued before it is done, and every token relayed costs ``token_s`` (a step's tokens come in
    one message, first tokens first); a finished request costs ``done_s`` (its last chunk, the
    response's end).  Zero costs: nothing waits (the model without an entry).  Starts due at the same
    time reach stage 0 one by one (messages, one at a time): an idle engine launches a step on the first
    and the others wait for its next step, as the records of every closed-loop wave show (the first
    request of a wave gets its first token alone, the others together one step later)."""

    arrive_s: float
    done_s: float
    token_s: float = 0.0
    free: float = 0.0
    last_start: float = -math.inf

    @property
    def serial(self) -> bool:
        return self.arrive_s > 0 or self.done_s > 0 or self.token_s > 0

    def relay(self, now: float, tokens: int) -> None:
        if tokens and self.token_s:
            self.free = max(now, self.free) + tokens * self.token_s

    def arrive(self, now: float) -> float:
        self.free = max(now, self.free) + self.arrive_s
        return self.free

    def start(self, now: float) -> float:
        at = max(now, self.free) if self.serial else now
        if at <= self.last_start:
            at = self.last_start + START_GAP_S
        self.last_start = at
        if self.serial:
            self.free = at
        return at

    def token(self, now: float) -> float:
        """A first token goes out once the work queued before it is done; relaying it is work too."""
        at = max(now, self.free)
        if self.token_s:
            self.free = at + self.token_s
        return at

    def done(self, now: float) -> float:
        self.free = max(now, self.free) + self.done_s
        return self.free


def _new_prompts(rep: _Replica, m: int) -> bool:
    """Whether the next step of micro-batch m would start a prompt: one waiting for a slot that it can
    take, or one admitted whose prefill has not begun."""
    return (bool(rep.waiting) and rep.running < rep.max_batch) or any(q.context == 0 for q in rep.members[m])


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest rank (as tools/bench_serve.py reports percentiles): with two closed-loop waves the
    median falls between them, and the two definitions pick different waves."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


HORIZON_SLOS = 4  # a rate is judged on at least this many SLOs' worth of arrivals
MAX_PEAK_REQUESTS = 20_000


def peak_rate_batching(cluster: Cluster, cost: CostModel, replicas: list[ReplicaLayout], workload: Workload, *,
                       target: float = 0.9, seed: int = 0, rel_tol: float = 0.02, max_batch: int | None = None) -> float:
    """The highest Poisson rate at which SLO attainment stays >= ``target``.

    A finite run only shows overload once the backlog outgrows the deadline: with many KV slots a
    short burst is all admitted at once and meets any SLO. So each rate is simulated for at least
    HORIZON_SLOS deadlines of arrivals and 10 x the slots (capped at MAX_PEAK_REQUESTS)."""
    slots = (max_batch or workload.max_batch) * len(replicas)

    def attainment(rate: float) -> float:
        n = max(workload.num_requests, min(MAX_PEAK_REQUESTS, max(math.ceil(rate * HORIZON_SLOS * workload.slo_s), 10 * slots)))
        work = Workload(rate, workload.slo_s, workload.prompt, workload.output, workload.max_batch, n)
        return simulate_batching(cluster, cost, replicas, work, seed=seed, max_batch=max_batch).slo_attainment

    return highest_rate(attainment, workload.rate, target, rel_tol) if replicas else 0.0

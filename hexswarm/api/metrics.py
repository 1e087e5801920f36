"""Prometheus metrics of one node (prometheus_client, a registry of its own per node; gauges read at scrape time
are one custom collector), rendered in the text exposition format 0.0.4 (`GET /metrics` on the HTTP API, see
docs/http.md).

`EntryMetrics` measures requests where they enter the swarm: it wraps
`SubmitService.serve(msg, emit, text)` and sees every frame the entry relays — the
accepted frame, each token (time to first token, inter-token latency), and the
final done/error frame (outcome, token counts, per-stage compute time).  Per-hop
network time comes from the request's trace spans (`SubmitService.trace`), fetched
in the background after a request finishes, a few at a time (others are skipped).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any

import prometheus_client
from prometheus_client.core import GaugeMetricFamily

from hexswarm.net import failures
from hexswarm.net.error_codes import meaning
from hexswarm.runtime.heap import frozen_objects, process_watch
from hexswarm.runtime.loop_watch import SLOW_BATCH_S, loop_watch

log = logging.getLogger("hexswarm.metrics")

# seconds; Prometheus' default buckets stretched for CPU swarms and long prompts
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

MAX_TRACE_FETCHES = 4  # per-hop network time: trace fetches in flight at once (more are skipped)


# no `_created` series beside each counter and histogram: the text stays what the node's scrapers read before.
# A process-wide switch (prometheus_client has no per-registry one): a node process has no other user of it
prometheus_client.disable_created_metrics()


class CallbackGauges:
    """Gauges read at scrape time, as one prometheus_client collector: each a name, a doc, label names and a
    callback returning {label values: value} (or one value).  A scrape never fails because one could not be read."""

    def __init__(self) -> None:
        self.gauges: list[tuple[str, str, tuple[str, ...], Callable[[], Any]]] = []

    def add(self, name: str, doc: str, labels: Sequence[str] = (), *, callback: Callable[[], Any]) -> None:
        self.gauges.append((name, doc, tuple(labels), callback))

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, doc, labels, callback in self.gauges:
            family = GaugeMetricFamily(name, doc, labels=labels)
            try:
                got = callback()
                values = sorted((list(k), float(v)) for k, v in (got if isinstance(got, dict) else {(): got}).items())
            except Exception:
                log.exception("metric %s: callback failed", name)
                values = []  # the gauge without samples, never a partly filled one
            for key, value in values:
                family.add_metric(key, value)
            yield family


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EntryMetrics:
    """The metrics of one node; `serve()` measures one request that enters through this node."""

    def __init__(self, node, server=None):
        self.node = node
        self.server = server
        self.started = time.time()
        r = self.registry = prometheus_client.CollectorRegistry()
        gauges = CallbackGauges()
        r.register(gauges)
        counter = partial(prometheus_client.Counter, registry=r)
        histogram = partial(prometheus_client.Histogram, registry=r)
        self.requests = counter("hexswarm_requests_total", "Requests that entered the swarm through this node, by API "
                                "(p2p submit, completions, chat) and outcome", ("api", "outcome"))
        self.http = counter("hexswarm_http_responses_total", "HTTP API responses by route and status code",
                            ("route", "status"))
        self.tokens = counter("hexswarm_generated_tokens_total", "Tokens generated for requests that entered here "
                              "(tokens/s: rate())")
        self.prompt_tokens = counter("hexswarm_prompt_tokens_total", "Prompt tokens of finished requests")
        self.ttft = histogram("hexswarm_time_to_first_token_seconds", "From a request's arrival at the entry to its "
                              "first token there", buckets=TTFT_BUCKETS)
        self.itl = histogram("hexswarm_inter_token_latency_seconds", "Between consecutive tokens of a request, at the "
                             "entry", buckets=ITL_BUCKETS)
        self.duration = histogram("hexswarm_request_duration_seconds", "From arrival at the entry to the final frame",
                                  buckets=DURATION_BUCKETS)
        self.stage_compute = histogram("hexswarm_stage_compute_seconds", "Compute time of one finished request at each "
                                       "pipeline stage (the done object's timings.stage_compute_s)", ("stage",),
                                       buckets=STAGE_BUCKETS)
        self.hop_network = histogram("hexswarm_hop_network_seconds", "Network time of one finished request into each "
                                     "pipeline stage (sum over its steps, from the request's trace spans)", ("stage",),
                                     buckets=STAGE_BUCKETS)
        self.hop_queue = histogram("hexswarm_stage_queue_seconds", "Time one finished request's steps waited at each "
                                   "stage (from its trace spans)", ("stage",), buckets=STAGE_BUCKETS)
        watch = process_watch()
        gauges.add("hexswarm_gc_passes", "Python collector passes in this node's process since it started, by "
                   "generation (2: full passes)", ("generation",),
                   callback=lambda: {(str(g),): float(n) for g, n in enumerate(watch.passes)})
        gauges.add("hexswarm_gc_pause_seconds", "Time this node's process spent in collector passes (the GIL held) "
                   "since it started, by generation", ("generation",),
                   callback=lambda: {(str(g),): s for g, s in enumerate(watch.seconds)})
        gauges.add("hexswarm_gc_longest_pause_seconds", "The longest collector pass in this node's process",
                   callback=lambda: watch.longest_s)
        gauges.add("hexswarm_gc_frozen_objects", "Objects exempt from collector passes (freeze_heap: the heap as "
                   "loaded)", callback=lambda: float(frozen_objects()))
        loop = loop_watch()
        gauges.add("hexswarm_event_loop_busy_seconds", "Wall time this node's event loop spent running tasks (not "
                   "waiting for I/O) since it started: what a start or a token waits behind",
                   callback=lambda: loop.busy_s)
        gauges.add("hexswarm_event_loop_longest_batch_seconds", "The longest run of tasks between two of the event "
                   "loop's I/O waits since it started", callback=lambda: loop.longest_s)
        gauges.add("hexswarm_event_loop_slow_batches", f"Runs of tasks of {SLOW_BATCH_S * 1e3:g} ms or more between "
                   "two of the event loop's I/O waits since it started", callback=lambda: float(loop.slow_batches))
        self.in_flight_entry = 0
        gauges.add("hexswarm_entry_in_flight", "Requests in flight that entered through this node",
                   callback=lambda: float(self.in_flight_entry))
        gauges.add("hexswarm_queue_depth", "Requests held by the stages this node serves (sum over its stages)",
                   callback=lambda: float(sum(s["in_flight"] for s in self._stages()  # a continued stage once
                                             if s.get("loaded_for", [s["epoch"], s["replica"], s["stage"]])
                                             == [s["epoch"], s["replica"], s["stage"]])))
        gauges.add("hexswarm_stage_in_flight", "Requests held by each stage this node serves",
                   ("epoch", "replica", "stage"),
                   callback=lambda: {(str(s["epoch"]), str(s["replica"]), str(s["stage"])): float(s["in_flight"])
                                     for s in self._stages()})
        gauges.add("hexswarm_peers_up", "Peers up in this node's table (itself included)",
                   callback=lambda: float(len(self.node.table.up())))
        gauges.add("hexswarm_layout_epoch", "Epoch of the committed layout this node knows (0: none)",
                   callback=self._epoch)
        gauges.add("hexswarm_serving_peers", "Live peers serving this node's model (itself included)",
                   callback=lambda: float(len(self.server.serving_view())) if self.server else 0.0)
        gauges.add("hexswarm_start_time_seconds", "Unix time this node's metrics started",
                   callback=lambda: self.started)
        gauges.add("hexswarm_unexpected_errors", "Unexpected exceptions while handling peers' messages, per protocol, "
                   "since start (each closed its stream; hexswarm.net.failures)", ("protocol",),
                   callback=lambda: {(k,): float(v) for k, v in failures.COUNTS.items()})
        self.trace_fetches = 0
        self.trace_skipped = counter("hexswarm_trace_fetches_skipped_total", "Finished requests whose per-hop times "
                                     "were not fetched (too many fetches in flight)")
        self._nursery = None  # for background trace fetches; set by start()

    def _stages(self) -> list[dict]:
        return self.server.stages.describe() if self.server is not None else []

    def _epoch(self) -> float:
        layout = getattr(self.server, "committed", None) if self.server is not None else None
        return float(layout.epoch) if layout is not None else 0.0

    def start(self, nursery) -> None:
        """Background work (per-hop time fetches) runs in `nursery` from now on."""
        self._nursery = nursery

    def render(self) -> str:
        return prometheus_client.generate_latest(self.registry).decode()

    async def serve(self, serve: Callable[..., Awaitable[dict]], msg: Any,
                    emit: Callable[[dict], Awaitable[None]], api: str,
                    put: Callable[[dict], None] | None = None) -> dict:
        """Run `serve(msg, emit, text=..., put=...)` (SubmitService.serve) and measure it.  Tokens are always
        asked for as a stream (to time them here); the caller's `emit` (or `put`, its non-blocking twin for
        token frames, if it has one) gets token frames only if it asked for them."""
        wants_tokens = bool(msg.get("stream", False)) if isinstance(msg, dict) else False
        if isinstance(msg, dict):
            msg = {**msg, "stream": True}
        t0 = time.monotonic()
        last: list[float] = []  # time of the previous token
        n_tokens = [0]

        def count(frame: dict) -> int:
            n = len(frame["batch"]) if "batch" in frame else int("token" in frame)  # a batch: tokens queued together
            if n:
                now = time.monotonic()
                try:
                    for _ in range(n):
                        if last:
                            self.itl.observe(now - last[0])
                        else:
                            self.ttft.observe(now - t0)
                        last[:] = [now]
                    n_tokens[0] += n
                    self.tokens.inc(n)
                except Exception:
                    log.exception("metrics: token")
            return n

        async def measured(frame: dict) -> None:
            if count(frame) and not wants_tokens:
                return
            await emit(frame)

        def measured_now(frame: dict) -> None:  # token frames only
            count(frame)
            if wants_tokens:
                put(frame)

        self.in_flight_entry += 1
        outcome = "cancelled"
        try:
            final = await serve(msg, measured, text=wants_tokens,
                                put=measured_now if put is not None or not wants_tokens else None)
            outcome = self._finished(final, n_tokens[0])
            return final
        except Exception:
            outcome = "internal"
            raise
        finally:
            self.in_flight_entry -= 1
            try:
                self.requests.labels(api=api, outcome=outcome).inc()
                self.duration.observe(time.monotonic() - t0)
            except Exception:
                log.exception("metrics: request")

    def _finished(self, final: dict, streamed: int) -> str:
        try:
            if "error" in final:
                return meaning(final["error"].get("code")).outcome
            done = final.get("done") or {}
            tokens = done.get("tokens") or []
            if len(tokens) > streamed:  # tokens the relay did not stream (should not happen: counted anyway)
                self.tokens.inc(len(tokens) - streamed)
            prompt = done.get("prompt_tokens")
            self.prompt_tokens.inc(len(prompt) if isinstance(prompt, list) else int(prompt or 0))
            for i, t in enumerate((done.get("timings") or {}).get("stage_compute_s") or []):
                self.stage_compute.labels(stage=i).observe(float(t))
            if done.get("request_id"):
                self._fetch_hops(str(done["request_id"]))
            return "ok"
        except Exception:
            log.exception("metrics: final frame")
            return "ok" if "done" in final else "error"

    def _fetch_hops(self, rid: str) -> None:
        if self._nursery is None or self.server is None:
            return
        if self.trace_fetches >= MAX_TRACE_FETCHES:
            self.trace_skipped.inc()
            return
        self.trace_fetches += 1
        self._nursery.start_soon(self._hops, rid)

    async def _hops(self, rid: str) -> None:
        import trio

        try:
            with trio.move_on_after(10):
                trace = await self.server.submit_service.trace(rid)
                for span in trace.get("spans") or []:
                    if "error" in span or "stage" not in span:
                        continue
                    self.hop_network.labels(stage=span["stage"]).observe(float(span.get("net_in_s", 0.0)))
                    self.hop_queue.labels(stage=span["stage"]).observe(float(span.get("queue_s", 0.0)))
        except Exception as e:  # metrics never break serving
            log.debug("metrics: trace of %s: %s", rid, e)
        finally:
            self.trace_fetches -= 1

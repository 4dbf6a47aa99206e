"""Prometheus metrics of the router, on a registry of its own (several routers can share a process).

The router's registry also serves the event plane's metrics (kvrouter.events.metrics:
ingest, gaps, epoch resets, lag, malformed entries, liveness, snapshots), which are
process-wide objects registered in each router's registry as well as in the default one.

The per-decision metrics (decisions, decision latency, predicted overlap, routed tokens)
are plain numbers the event loop adds to and a collector turns into Prometheus families
when scraped (`_DecisionTally`): five prometheus_client updates, each taking a lock, cost
~5 us of a ~25 us RouteStream decision. The other per-request metrics are bound label
children cached in dicts; per-worker gauges are read from a snapshot the server
refreshes periodically, so scraping never touches the scheduler from the HTTP thread.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import INF, floatToGoString

from kvrouter.events import metrics as event_metrics
from kvrouter.security import metrics as security_metrics

LATENCY_BUCKETS = (
    10e-6, 20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 0.25, 1.0,
)
# request latencies against SLOs (TTFT, inter-token): 5 ms to 30 s
SLO_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
               1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0)


@dataclass(frozen=True, slots=True)
class WorkerSample:
    model: str
    worker: str
    status: str
    reserved_prefill_tokens: int
    reserved_decode_blocks: int
    reserved_requests: int
    cached_blocks: int
    approx: bool = False  # approximate mode: cache predicted from the router's decisions
    kv_capacity_blocks: int = 0  # what the cache-pressure term uses (0: off for the worker)


class _WorkerCollector(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: list[WorkerSample] = []
        self._models: list[str] = []
        self._capacity_reports: dict[str, dict[str, int]] = {}
        self._statuses: tuple[str, ...] = ("up", "draining", "down", "mismatch")

    def set(self, samples: Iterable[WorkerSample], models: Iterable[str],
            capacity_reports: dict[str, dict[str, int]] | None = None) -> None:
        with self._lock:
            self._samples = list(samples)
            self._models = list(models)
            self._capacity_reports = dict(capacity_reports or {})

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            samples = list(self._samples)
            models = list(self._models)
            capacity_reports = dict(self._capacity_reports)
        per_worker = [
            ("kvrouter_worker_reserved_prefill_tokens",
             "Prompt tokens reserved by the router on the worker", "reserved_prefill_tokens"),
            ("kvrouter_worker_reserved_decode_blocks",
             "KV blocks reserved by the router for active requests on the worker",
             "reserved_decode_blocks"),
            ("kvrouter_worker_reserved_requests",
             "Requests with an open reservation on the worker", "reserved_requests"),
            ("kvrouter_worker_cached_blocks",
             "Blocks of the worker in the router's prefix index (approx: predicted)",
             "cached_blocks"),
            ("kvrouter_worker_approx",
             "1: approximate mode (cache predicted from routing decisions), 0: exact (KV events)",
             "approx"),
            ("kvrouter_worker_kv_capacity_blocks",
             "KV capacity the cache-pressure term uses (0: none reported, term off)",
             "kv_capacity_blocks"),
        ]
        for name, doc, attr in per_worker:
            fam = GaugeMetricFamily(name, doc, labels=["model", "worker"])
            for s in samples:
                fam.add_metric([s.model, s.worker], getattr(s, attr))
            yield fam
        up = GaugeMetricFamily("kvrouter_workers", "Workers known to the router, by status",
                               labels=["model", "status"])
        for model in models:
            for status in self._statuses:
                n = sum(1 for s in samples if s.model == model and s.status == status)
                up.add_metric([model, status], n)
        yield up
        ignored = CounterMetricFamily(
            "kvrouter_capacity_reports_ignored",
            "Load reports whose KV capacity was missing/0 or absurd (pressure term off)",
            labels=["model", "reason"])
        for model, counts in capacity_reports.items():
            for reason, n in sorted(counts.items()):
                ignored.add_metric([model, reason], n)
        yield ignored


@dataclass(slots=True)
class _Hist:
    """One histogram's counts per bucket (not cumulative; the last is +Inf) and sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # `le` is inclusive
        self.total += value


@dataclass(eq=False)  # hashable by identity: the registry keys collectors by them
class _DecisionTally(Collector):
    """Per-decision metrics as plain numbers. Written on one thread only (the router's
    event loop: lock-free increments would lose updates across threads); the HTTP thread
    copies them under the GIL (one C-level copy each) and reports the copies, with every
    histogram's count taken from its own buckets so that +Inf always equals _count."""

    decisions: dict[tuple[str, str, str], int] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)  # model -> [prompt, expected]
    latency: dict[str, _Hist] = field(default_factory=dict)
    ratio: dict[str, _Hist] = field(default_factory=dict)

    def decided(self, model: str, policy: str, seconds: float, overlap_ratio: float,
                prompt_tokens: int, expected_output_tokens: int) -> None:
        if prompt_tokens or expected_output_tokens:  # the autoscaler's lengths (docs/autoscale.md)
            t = self.tokens.get(model)
            if t is None:
                t = self.tokens[model] = [0, 0]
            t[0] += prompt_tokens
            t[1] += expected_output_tokens
        key = (model, policy, "routed")
        self.decisions[key] = self.decisions.get(key, 0) + 1
        h = self.latency.get(model)
        if h is None:
            h = self.latency[model] = _Hist(LATENCY_BUCKETS)
        h.observe(seconds)
        o = self.ratio.get(model)
        if o is None:
            o = self.ratio[model] = _Hist(RATIO_BUCKETS)
        o.observe(overlap_ratio)

    def failed(self, model: str, policy: str, outcome: str) -> None:
        key = (model, policy, outcome)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    @staticmethod
    def _histogram(name: str, doc: str, hists: dict[str, _Hist]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=["model"])
        for model, h in list(hists.items()):
            counts, total = list(h.counts), h.total
            cum, buckets = 0, []
            for bound, n in zip((*h.bounds, INF), counts, strict=True):
                cum += n
                buckets.append((floatToGoString(bound), cum))
            fam.add_metric([model], buckets, total)
        return fam

    def collect(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily("kvrouter_decisions",
                                        "Routing decisions by model, policy and outcome",
                                        labels=["model", "policy", "outcome"])
        for key, n in list(self.decisions.items()):
            decisions.add_metric(list(key), n)
        yield decisions
        tokens = CounterMetricFamily("kvrouter_routed_tokens",
                                     "Prompt and expected output tokens of routed requests",
                                     labels=["model", "kind"])
        for model, (prompt, expected) in list(self.tokens.items()):
            tokens.add_metric([model, "prompt"], prompt)
            tokens.add_metric([model, "expected_output"], expected)
        yield tokens
        yield self._histogram("kvrouter_decision_seconds",
                              "Time to decide one request inside the router", self.latency)
        yield self._histogram("kvrouter_predicted_overlap_ratio",
                              "Share of the prompt's blocks cached on the chosen worker "
                              "(router's prediction)", self.ratio)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # kvrouter_decisions, kvrouter_decision_seconds, kvrouter_predicted_overlap_ratio,
        # kvrouter_routed_tokens
        self.tally = _DecisionTally()
        r.register(self.tally)
        self.expired = Counter(
            "kvrouter_reservations_expired", "Reservations freed by lease expiry", ["model"],
            registry=r)
        self.released = Counter(
            "kvrouter_reservations_released", "Release calls by outcome", ["model", "outcome"],
            registry=r)
        self.event_batches = Counter(
            "kvrouter_publish_events", "PublishEvents batches received over gRPC",
            ["model", "outcome"], registry=r)
        # Session affinity and the endpoint picker (server/affinity.py, server/ext_proc.py).
        self.session_affinity = Counter(
            "kvrouter_session_affinity", "Requests with a session key by what affinity did: "
            "kept (the session's worker decided), moved (it was overloaded or unavailable), new",
            ["model", "outcome"], registry=r)
        self.ext_proc = Counter(
            "kvrouter_ext_proc_requests", "Endpoint picker (Envoy ext_proc) requests by outcome: "
            "picked, or the HTTP status of the immediate response", ["outcome"], registry=r)
        # Sessions' KV around tool calls (server/sessions.py, docs/kv-offload.md).
        self.session_kv = Counter(
            "kvrouter_session_kv", "Sessions' KV around tool calls: decided_<keep|offload|drop>, "
            "<keep|offload>_ok, <keep|offload>_failed_<grpc status>, reloaded, unpinned, "
            "reload_failed_<grpc status>, expired, no_engine_api", ["event"], registry=r)
        # The OpenAI-compatible HTTP front (kvrouter.http, docs/http-front.md).
        self.http_requests = Counter(
            "kvrouter_http_requests", "HTTP front requests by endpoint and HTTP status "
            "(499: the client went away)", ["endpoint", "status"], registry=r)
        # Admission control (kvrouter.server.admission, docs/admission.md).
        self.admission = Counter(
            "kvrouter_admission", "Admission control outcomes: admitted (at once), queued, "
            "dispatched (after waiting), expired, deadline_passed, queue_full, shed, "
            "cancelled, unknown_class", ["model", "class", "outcome"], registry=r)
        self.admission_wait = Histogram(
            "kvrouter_admission_wait_seconds", "Time a dispatched request waited in the "
            "admission queue", ["model", "class"],
            buckets=(1e-3, 5e-3, 0.02, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=r)
        self.admission_queued = Gauge(
            "kvrouter_admission_queued", "Requests waiting in the admission queue",
            ["model", "class"], registry=r)
        self.generate_requests = Counter(
            "kvrouter_generate_requests", "Router.Generate requests answered, by pool",
            ["model", "pool"], registry=r)
        self.generate_tokens = Counter(
            "kvrouter_generate_tokens", "Prompt and output tokens of answered Generate calls",
            ["model", "pool", "kind"], registry=r)
        self.generate_class_requests = Counter(
            "kvrouter_generate_class_requests",
            "Router.Generate requests answered, by pool and the specialiser's request class "
            "(short: the aggregated pool's; the autoscaling planner sizes that pool from it)",
            ["model", "pool", "class"], registry=r)
        self.generate_class_tokens = Counter(
            "kvrouter_generate_class_tokens",
            "Prompt and output tokens of answered Generate calls, by pool and request class",
            ["model", "pool", "class", "kind"], registry=r)
        self.generate_ttft = Histogram(
            "kvrouter_generate_ttft_seconds", "Time to first token of Generate, by pool",
            ["model", "pool"], buckets=SLO_BUCKETS, registry=r)
        self.generate_itl = Histogram(
            "kvrouter_generate_itl_seconds", "Mean inter-token latency of a Generate call",
            ["model", "pool"], buckets=SLO_BUCKETS, registry=r)
        self.workers = _WorkerCollector()
        r.register(self.workers)
        for collector in (*event_metrics.ALL, *security_metrics.ALL):
            r.register(collector)
        self._http: object | None = None

    # hot path ------------------------------------------------------------
    def decided(self, model: str, policy: str, seconds: float, overlap_ratio: float,
                prompt_tokens: int = 0, expected_output_tokens: int = 0) -> None:
        """One routed decision (on the router's event loop: see _DecisionTally)."""
        self.tally.decided(model, policy, seconds, overlap_ratio, prompt_tokens,
                           expected_output_tokens)

    def generated(self, model: str, pool: str, prompt_tokens: int, output_tokens: int,
                  ttft_s: float, decode_s: float, request_class: str = "") -> None:
        """One answered Generate call (the autoscaling planner's telemetry per pool)."""
        self.generate_requests.labels(model, pool).inc()
        self.generate_tokens.labels(model, pool, "prompt").inc(prompt_tokens)
        self.generate_tokens.labels(model, pool, "output").inc(output_tokens)
        if request_class:
            self.generate_class_requests.labels(model, pool, request_class).inc()
            self.generate_class_tokens.labels(model, pool, request_class, "prompt").inc(
                prompt_tokens)
            self.generate_class_tokens.labels(model, pool, request_class, "output").inc(
                output_tokens)
        self.generate_ttft.labels(model, pool).observe(ttft_s)
        if output_tokens > 1:
            self.generate_itl.labels(model, pool).observe(decode_s / (output_tokens - 1))

    def admission_outcome(self, model: str, cls: str, outcome: str) -> None:
        self.admission.labels(model, cls, outcome).inc()

    def failed(self, model: str, policy: str, outcome: str) -> None:
        self.tally.failed(model, policy, outcome)

    # HTTP ----------------------------------------------------------------
    def serve(self, host: str, port: int, **tls: Any) -> int:
        """Start /metrics in a daemon thread; returns the bound port. `tls`: certfile,
        keyfile ... of start_http_server (kvrouter.security.tls.TlsFiles.prometheus_kwargs)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry, **tls)
        self._http = server
        return int(server.server_address[1])

    def stop(self) -> None:
        server, self._http = self._http, None
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]

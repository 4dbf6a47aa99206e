"""Prometheus metrics of the router, on a registry of its own (several routers can share a process).

The router's registry also serves the event plane's metrics (kvrouter.events.metrics:
ingest, gaps, epoch resets, lag, malformed entries, liveness, snapshots), which are
process-wide objects registered in each router's registry as well as in the default one.

Per-request metrics are bound label children cached in dicts so the hot path costs one
dict lookup and one increment; per-worker gauges are read from a snapshot the server
refreshes periodically, so scraping never touches the scheduler from the HTTP thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter(
            "kvrouter_decisions", "Routing decisions by model, policy and outcome",
            ["model", "policy", "outcome"], registry=r)
        self.decision_latency = Histogram(
            "kvrouter_decision_seconds", "Time to decide one request inside the router",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.overlap_ratio = Histogram(
            "kvrouter_predicted_overlap_ratio",
            "Share of the prompt's blocks cached on the chosen worker (router's prediction)",
            ["model"], buckets=RATIO_BUCKETS, registry=r)
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
        self.routed_tokens = Counter(
            "kvrouter_routed_tokens", "Prompt and expected output tokens of routed requests",
            ["model", "kind"], registry=r)
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
        self._decision_children: dict[tuple[str, str, str], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}
        self._ratio_children: dict[str, Histogram] = {}
        self._token_children: dict[str, tuple[Counter, Counter]] = {}
        self._http: object | None = None

    # hot path ------------------------------------------------------------
    def decided(self, model: str, policy: str, seconds: float, overlap_ratio: float,
                prompt_tokens: int = 0, expected_output_tokens: int = 0) -> None:
        if prompt_tokens or expected_output_tokens:  # the autoscaler's lengths (docs/autoscale.md)
            t = self._token_children.get(model)
            if t is None:  # labels() costs ~1 us a call: children are bound once per model
                t = self._token_children[model] = (self.routed_tokens.labels(model, "prompt"),
                                                   self.routed_tokens.labels(model, "expected_output"))
            t[0].inc(prompt_tokens)
            t[1].inc(expected_output_tokens)
        key = (model, policy, "routed")
        c = self._decision_children.get(key)
        if c is None:
            c = self._decision_children[key] = self.decisions.labels(*key)
        c.inc()
        h = self._latency_children.get(model)
        if h is None:
            h = self._latency_children[model] = self.decision_latency.labels(model)
        h.observe(seconds)
        o = self._ratio_children.get(model)
        if o is None:
            o = self._ratio_children[model] = self.overlap_ratio.labels(model)
        o.observe(overlap_ratio)

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
        key = (model, policy, outcome)
        c = self._decision_children.get(key)
        if c is None:
            c = self._decision_children[key] = self.decisions.labels(*key)
        c.inc()

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

"""Prometheus metrics of the security layer, process-wide like kvrouter.events.metrics: they
live in prometheus_client's default registry and in `ALL`, which the router registers in
its own registry so that its /metrics serves them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge
from prometheus_client.registry import Collector

AUTH_DENIED = Counter(
    "kvrouter_auth_denied_total", "gRPC calls refused by the access policy, by reason",
    ["reason"],  # unauthenticated | role | identity | wrong_port
)
INSECURE_LISTENERS = Gauge(
    "kvrouter_insecure_listener",
    "1 for a listener reachable from other machines without TLS and authentication "
    "(started with --insecure)", ["listener"],
)
EVENTS_REJECTED = Counter(
    "kvrouter_events_unauthenticated_total",
    "Stream entries and heartbeats dropped because their signature was missing or wrong",
    ["kind", "reason"],  # kind: entry | heartbeat; reason: unsigned | bad_signature | unknown_key
)

ALL: tuple[Collector, ...] = (AUTH_DENIED, INSECURE_LISTENERS, EVENTS_REJECTED)


class _SecurityMetrics:
    """Pre-bound children, so a refused call costs one dict lookup."""

    def __init__(self) -> None:
        self._denied: dict[str, Counter] = {}

    def denied(self, reason: str) -> None:
        c = self._denied.get(reason)
        if c is None:
            c = self._denied[reason] = AUTH_DENIED.labels(reason)
        c.inc()

    @staticmethod
    def insecure(listener: str) -> None:
        INSECURE_LISTENERS.labels(listener).set(1)


SECURITY_METRICS = _SecurityMetrics()

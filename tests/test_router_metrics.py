"""The router's per-decision metrics (server/metrics.py _DecisionTally): plain counts the
event loop adds to, reported as Prometheus families with the names, labels and bucket
rule (`le` is inclusive) a prometheus_client Histogram and Counter would give."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvrouter.server.metrics import LATENCY_BUCKETS, RATIO_BUCKETS, RouterMetrics


def _samples(text: str, family: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) if fam.name == family
            for s in fam.samples if not s.name.endswith("_created")}


def test_decision_metrics_match_what_prometheus_client_would_report() -> None:
    m = RouterMetrics()
    ref = CollectorRegistry()
    decisions = Counter("kvrouter_decisions", "d", ["model", "policy", "outcome"], registry=ref)
    latency = Histogram("kvrouter_decision_seconds", "l", ["model"], buckets=LATENCY_BUCKETS,
                        registry=ref)
    ratio = Histogram("kvrouter_predicted_overlap_ratio", "r", ["model"],
                      buckets=RATIO_BUCKETS, registry=ref)
    tokens = Counter("kvrouter_routed_tokens", "t", ["model", "kind"], registry=ref)
    # values on bucket bounds (inclusive), between them, past the last and at zero
    cases = [("a", "kv", 10e-6, 0.0, 100, 10), ("a", "kv", 15e-6, 0.5, 50, 0),
             ("a", "round_robin", 2.0, 1.0, 7, 3), ("b", "kv", 1e-3, 0.99, 0, 0),
             ("b", "kv", 0.0, 0.05, 1, 1)]
    for model, policy, secs, r, p, e in cases:
        m.decided(model, policy, secs, r, p, e)
        decisions.labels(model, policy, "routed").inc()
        latency.labels(model).observe(secs)
        ratio.labels(model).observe(r)
        if p or e:
            tokens.labels(model, "prompt").inc(p)
            tokens.labels(model, "expected_output").inc(e)
    m.failed("a", "kv", "invalid_argument")
    decisions.labels("a", "kv", "invalid_argument").inc()

    ours, theirs = generate_latest(m.registry).decode(), generate_latest(ref).decode()
    for family in ("kvrouter_decisions", "kvrouter_decision_seconds",
                   "kvrouter_predicted_overlap_ratio", "kvrouter_routed_tokens"):
        assert _samples(ours, family) == _samples(theirs, family), family
    # the inclusive bound: 10 us is in le="1e-05", 15 us first in le="2e-05"
    got = _samples(ours, "kvrouter_decision_seconds")
    assert got[("kvrouter_decision_seconds_bucket", (("le", "1e-05"), ("model", "a")))] == 1
    assert got[("kvrouter_decision_seconds_bucket", (("le", "2e-05"), ("model", "a")))] == 2
    assert got[("kvrouter_decision_seconds_bucket", (("le", "+Inf"), ("model", "a")))] == 3
    assert got[("kvrouter_decision_seconds_count", (("model", "a"),))] == 3


def test_an_unused_router_reports_the_families_without_samples() -> None:
    text = generate_latest(RouterMetrics().registry).decode()
    names = {fam.name for fam in text_string_to_metric_families(text)}
    assert {"kvrouter_decisions", "kvrouter_decision_seconds",
            "kvrouter_predicted_overlap_ratio", "kvrouter_routed_tokens"} <= names

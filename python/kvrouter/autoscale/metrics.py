"""Prometheus metrics of the autoscaling planner (a registry of its own unless one is given)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class AutoscaleMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry(auto_describe=True)
        labels = ["model", "pool"]
        self.target = Gauge("kvrouter_autoscale_target_workers",
                            "Workers the planner wants, by role", [*labels, "role"], registry=r)
        self.workers = Gauge("kvrouter_autoscale_workers",
                             "Workers the planner sees, by role and phase",
                             [*labels, "role", "phase"], registry=r)
        self.predicted_rate = Gauge("kvrouter_autoscale_predicted_rate",
                                    "Predicted arrivals per second for the next interval",
                                    labels, registry=r)
        self.observed_rate = Gauge("kvrouter_autoscale_observed_rate",
                                   "Arrivals per second in the last interval", labels, registry=r)
        self.slo_unreachable = Gauge(
            "kvrouter_autoscale_slo_unreachable",
            "1 while the SLO cannot be met within max_workers (the pool runs at the maximum)",
            labels, registry=r)
        self.kv_usage = Gauge("kvrouter_autoscale_kv_usage",
                              "Share of the decode workers' KV blocks in use (load reports)",
                              labels, registry=r)
        self.layout_workers = Gauge(
            "kvrouter_autoscale_layout_workers",
            "Workers each layout needs at the last sizing (disaggregated; with_aggregated: "
            "short requests on aggregated workers)", [*labels, "layout"], registry=r)
        self.correction = Gauge("kvrouter_autoscale_correction",
                                "Multiplier on the modelled need from observed SLO misses",
                                [*labels, "role"], registry=r)
        self.decisions = Counter("kvrouter_autoscale_decisions", "Planner ticks by outcome",
                                 [*labels, "outcome"], registry=r)
        self.actions = Counter("kvrouter_autoscale_actions", "Actuator actions by kind and outcome",
                               [*labels, "action", "outcome"], registry=r)
        self.telemetry_gaps = Counter("kvrouter_autoscale_telemetry_gaps",
                                      "Ticks without usable telemetry (the planner held)",
                                      labels, registry=r)
        self.not_ready = Counter("kvrouter_autoscale_workers_not_ready",
                                 "Workers stopped because they never became ready", labels,
                                 registry=r)

"""Fleet simulator: simulated engines behind the router's own index and scheduler."""

from kvrouter.fleet.oracle import OracleResult, pooled_lru
from kvrouter.fleet.report import FleetReport, RequestRecord, build_report
from kvrouter.fleet.simulator import (
    POLICIES,
    FleetConfig,
    FleetRequest,
    FleetResult,
    FleetSimulator,
    SchedulerWeights,
    prepare,
    simulate,
)
from kvrouter.fleet.traces import (
    Trace,
    TraceError,
    TraceRequest,
    load_azure,
    load_mooncake,
    synthetic_sessions,
    synthetic_shared_prefix,
    trace_hashes,
)

__all__ = [
    "POLICIES",
    "FleetConfig",
    "FleetReport",
    "FleetRequest",
    "FleetResult",
    "FleetSimulator",
    "OracleResult",
    "RequestRecord",
    "SchedulerWeights",
    "Trace",
    "TraceError",
    "TraceRequest",
    "build_report",
    "load_azure",
    "load_mooncake",
    "pooled_lru",
    "prepare",
    "simulate",
    "synthetic_sessions",
    "synthetic_shared_prefix",
    "trace_hashes",
]

"""Autoscaling planner: sizes prefill/decode pools from the router's telemetry (docs/autoscale.md).

Not to be confused with `kvrouter.planner`, which places one request on a pool.
"""

from kvrouter.autoscale.config import SLO, AutoscaleConfig
from kvrouter.autoscale.core import (
    Action,
    ActionKind,
    Autoscaler,
    Decision,
    Phase,
    PoolTelemetry,
    WorkerView,
)
from kvrouter.autoscale.metrics import AutoscaleMetrics
from kvrouter.autoscale.predictor import Forecast, LoadPredictor
from kvrouter.autoscale.sizing import Load, Need, PerfModel, erlang_c

__all__ = [
    "SLO",
    "Action",
    "ActionKind",
    "AutoscaleConfig",
    "AutoscaleMetrics",
    "Autoscaler",
    "Decision",
    "Forecast",
    "Load",
    "LoadPredictor",
    "Need",
    "PerfModel",
    "Phase",
    "PoolTelemetry",
    "WorkerView",
    "erlang_c",
]

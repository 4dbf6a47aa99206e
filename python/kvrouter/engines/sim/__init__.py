"""Simulated engine: a calibrated cost model, a paged KV cache and a step-based core.

The same core runs inside the fleet simulator (kvrouter.fleet) and, wrapped by a
server that maps simulated time to wall time, as a standalone engine.
"""

from kvrouter.engines.sim.engine import (
    EngineConfig,
    EngineStats,
    Phase,
    RequestMode,
    RequestUpdate,
    SimEngine,
    SimRequest,
    StepRecord,
)
from kvrouter.engines.sim.kvcache import CacheFull, PagedKvCache
from kvrouter.engines.sim.profile import DEFAULT_CALIBRATION, EngineProfile, ProfileError

__all__ = [
    "DEFAULT_CALIBRATION",
    "CacheFull",
    "EngineConfig",
    "EngineProfile",
    "EngineStats",
    "PagedKvCache",
    "Phase",
    "ProfileError",
    "RequestMode",
    "RequestUpdate",
    "SimEngine",
    "SimRequest",
    "StepRecord",
]

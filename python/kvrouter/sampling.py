"""SamplingParams (proto) -> keyword arguments for an engine, one mapping for every adapter.

Only fields the caller set are passed, so each engine keeps its own defaults for the rest
(temperature unset: the engine's default; 0: greedy)."""

from __future__ import annotations

import math
from typing import Any

from kvrouter._proto.v1 import common_pb2


def sampling_problem(sp: common_pb2.SamplingParams) -> str | None:
    """Why `sp` cannot be passed to an engine (NaN, infinite or out-of-range values), or
    None. Checked once where a request enters the router, before anything is reserved."""
    if sp.HasField("temperature") and not (math.isfinite(sp.temperature)
                                            and sp.temperature >= 0):
        return f"sampling.temperature must be a finite number >= 0, got {sp.temperature}"
    if not (math.isfinite(sp.top_p) and 0 <= sp.top_p <= 1):
        return f"sampling.top_p must be in [0, 1] (0: unset), got {sp.top_p}"
    if sp.top_k < 0:
        return f"sampling.top_k must be >= 0 (0: unset), got {sp.top_k}"
    if sp.max_tokens < 0:
        return f"sampling.max_tokens must be >= 0, got {sp.max_tokens}"
    return None


def sampling_kwargs(sp: common_pb2.SamplingParams, *, with_n: bool = False) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if sp.HasField("temperature"):
        kw["temperature"] = sp.temperature
    if sp.top_p > 0:
        kw["top_p"] = sp.top_p
    if sp.top_k > 0:
        kw["top_k"] = sp.top_k
    if sp.HasField("seed"):
        kw["seed"] = sp.seed
    if sp.stop_token_ids:
        kw["stop_token_ids"] = list(sp.stop_token_ids)
    if sp.ignore_eos:
        kw["ignore_eos"] = True
    if with_n and sp.n > 1:
        kw["n"] = sp.n
    return kw

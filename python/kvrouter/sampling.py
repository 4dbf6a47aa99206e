"""SamplingParams (proto) -> keyword arguments for an engine, one mapping for every adapter.

Only fields the caller set are passed, so each engine keeps its own defaults for the rest
(temperature unset: the engine's default; 0: greedy)."""

from __future__ import annotations

from typing import Any

from kvrouter._proto.v1 import common_pb2


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

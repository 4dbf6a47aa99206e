"""Engine.Offload / Engine.Reload of the simulated engine: gRPC glue around host_tier.

Statuses (docs/kv-offload.md): an empty session id INVALID_ARGUMENT; a session this
worker never served (or that expired) NOT_FOUND; TIER_DISK, or a worker started without
a host tier, UNIMPLEMENTED; a host tier that cannot take the session RESOURCE_EXHAUSTED
(nothing moved). An Offload answers after its copy's simulated duration (bytes over the
calibrated device-to-host bandwidth, scaled by the worker's time scale). A Reload answers
as soon as its copy is queued on the host link: the blocks are in the prefix cache but
landing until the copy ends, and a Generate that reuses them prefills alongside the copy
layer by layer (SimRequest.load_until from host_tier.SessionKv.loading_until, the path
bench/agentic measures), so the next turn pays only what its prefill does not hide.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc

from kvrouter._proto.v1 import common_pb2, engine_pb2
from kvrouter.engines.sim.host_tier import HostFull, Moved, UnknownSession
from kvrouter.engines.sim.worker import SimWorker
from kvrouter.grpc_server import unimplemented

MAX_SESSION_ID_BYTES = 256
_TIER_PB = {"gpu": common_pb2.TIER_GPU, "host": common_pb2.TIER_HOST, "disk": common_pb2.TIER_DISK}


def note_session(sim: SimWorker, session_id: str, chain: Sequence[int]) -> None:
    if sim.kv is not None and len(session_id.encode()) <= MAX_SESSION_ID_BYTES:
        sim.kv.note(session_id, chain, sim.sim_now())


async def _check(sim: SimWorker, session_id: str, context: grpc.aio.ServicerContext[Any, Any],
                 ) -> None:
    if not session_id or len(session_id.encode()) > MAX_SESSION_ID_BYTES:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"session_id must be 1..{MAX_SESSION_ID_BYTES} bytes, got "
                            f"{len(session_id.encode())}")
    if sim.kv is None:
        await unimplemented(context, "this simulated engine runs without a host KV tier "
                                     "(--host-kv-capacity-tokens 0): Offload / Reload are off")


async def _copied(sim: SimWorker, moved: Moved) -> None:
    if moved.seconds > 0:
        await asyncio.sleep(moved.seconds * sim.time_scale)


async def offload(sim: SimWorker, request: engine_pb2.OffloadRequest,
                  context: grpc.aio.ServicerContext[Any, Any]) -> engine_pb2.OffloadResponse:
    await _check(sim, request.session_id, context)
    assert sim.kv is not None
    target = request.target
    if target == common_pb2.TIER_DISK:
        await unimplemented(context, "the simulated engine has no disk KV tier")
    if target not in (common_pb2.TIER_UNSPECIFIED, common_pb2.TIER_HOST, common_pb2.TIER_GPU):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown tier {target}")
    sim.load()  # bring the cache up to now
    try:
        if target == common_pb2.TIER_GPU:
            moved = sim.kv.keep(request.session_id, sim.sim_now())
        else:
            moved = sim.kv.offload(request.session_id, sim.sim_now())
    except UnknownSession as e:
        await context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))
        raise AssertionError("unreachable") from None  # pragma: no cover
    except HostFull as e:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        raise AssertionError("unreachable") from None  # pragma: no cover
    sim.load()  # the driver publishes the tier-tagged events
    await _copied(sim, moved)
    return engine_pb2.OffloadResponse(blocks=moved.blocks, tier=_TIER_PB[moved.tier.wire])


async def reload(sim: SimWorker, request: engine_pb2.ReloadRequest,
                 context: grpc.aio.ServicerContext[Any, Any]) -> engine_pb2.ReloadResponse:
    await _check(sim, request.session_id, context)
    assert sim.kv is not None
    sim.load()
    try:
        moved = sim.kv.reload(request.session_id, sim.sim_now())
    except UnknownSession as e:
        await context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))
        raise AssertionError("unreachable") from None  # pragma: no cover
    sim.load()  # the driver publishes the blocks' GPU events; the copy runs on
    return engine_pb2.ReloadResponse(blocks=moved.blocks)

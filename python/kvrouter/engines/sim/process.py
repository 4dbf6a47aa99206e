"""The simulated engine as a worker process: options, start-up, serving and shutdown.

`run_worker` builds a SimEngine from a calibration profile, serves the
kvrouter.v1.Engine gRPC service around it (kvrouter.engines.sim.servicer) and
reports to a router like any engine: events, heartbeats and load reports go
through `EventPublisher`, to Redis Streams with `redis`, else to the router over
gRPC (kvrouter.engines.router_link: RegisterWorker at start, Heartbeat with load,
PublishEvents with per-worker epoch and seq, DeregisterWorker on a clean shutdown).
The command line is kvrouter.engines.sim.command.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from kvrouter._proto.v1 import engine_pb2_grpc
from kvrouter.config import LayeredSettings
from kvrouter.engines.router_link import RegistrationRefused, RouterGrpcTransport, register_with_retry
from kvrouter.engines.sim.engine import EngineConfig, SimEngine
from kvrouter.engines.sim.host_tier import DEFAULT_TTL_S, SessionKv
from kvrouter.engines.sim.profile import DEFAULT_CALIBRATION, EngineProfile, ProfileError
from kvrouter.engines.sim.servicer import SimEngineService
from kvrouter.engines.sim.worker import SimWorker
from kvrouter.events.publisher import EventPublisher, redis_publisher
from kvrouter.grpc_server import ENGINE_SERVICE, GrpcServer, ListenError
from kvrouter.mainloop import stop_on_signals
from kvrouter.security.router import EngineSecurity

log = logging.getLogger("kvrouter.engines.sim")

DEFAULT_ROUTER = "127.0.0.1:50051"
# The router's default model block size (kvrouter.config.ModelConfig); used with --redis
# when --block-size is not given, since there is no registration reply to learn it from.
DEFAULT_REDIS_BLOCK_SIZE = 16


class SetupError(RuntimeError):
    """The engine cannot start (bad option, router refused it, port taken)."""


class SimOptions(LayeredSettings):
    """`kvrouter engine sim` options, validated like every option type (kvrouter.config)."""

    worker_id: str = Field(min_length=1)
    model: str = Field(default="default", min_length=1)
    router: str | None = None
    redis: str | None = None
    namespace: str = "kvrouter"
    listen: str = "127.0.0.1:0"
    advertise: str | None = None
    profile: str = str(DEFAULT_CALIBRATION)
    kv_capacity_tokens: int | None = Field(default=None, gt=0)
    time_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    block_size: int | None = Field(default=None, gt=0)
    role: Literal["aggregated", "prefill", "decode"] = "aggregated"  # kvrouter.registry.Role
    vocab_size: int = Field(default=32000, gt=0)
    max_num_seqs: int = Field(default=256, gt=0)
    max_num_batched_tokens: int = Field(default=8192, gt=0)
    max_prompt_tokens: int = Field(default=1 << 20, gt=0)
    ready_file: str | None = None
    link_gbps: float = Field(default=50.0, gt=0)  # prefill -> decode KV link (generation-only imports)
    pool: str = ""  # router pool (kvrouter.planner); empty: the role's default pool
    # host KV tier for Offload / Reload (host_tier.py); None: 4x the GPU KV capacity, 0: none
    host_kv_capacity_tokens: int | None = Field(default=None, ge=0)
    # host <-> GPU copy bandwidth in GB/s; None: the profile's measured copy
    h2d_gbps: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    session_ttl_s: float = Field(default=DEFAULT_TTL_S, gt=0, allow_inf_nan=False)


def _advertised(listen: str, port: int, advertise: str | None) -> str:
    if advertise:
        return advertise
    host = listen.rpartition(":")[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run_worker(opts: SimOptions, stop: asyncio.Event | None = None) -> None:
    """Run one simulated engine until `stop` is set (or SIGINT / SIGTERM)."""
    try:
        profile = EngineProfile.load(opts.profile)
    except ProfileError as e:
        raise SetupError(str(e)) from None
    stop = stop or asyncio.Event()
    stop_on_signals(stop.set)

    try:
        # TLS / mutual TLS from KVROUTER_TLS_*, principals from KVROUTER_AUTH_FILE
        # (kvrouter.security.router.EngineSecurity), like the router link.
        sec = EngineSecurity.from_env(opts.listen)
        server = GrpcServer(opts.listen, [ENGINE_SERVICE], tls=sec.tls,
                            interceptors=sec.interceptors)
    except (ListenError, RuntimeError) as e:
        raise SetupError(str(e)) from None
    address = _advertised(opts.listen, server.port, opts.advertise)

    h2d_bytes_per_s = opts.h2d_gbps * 1e9 if opts.h2d_gbps else profile.h2d_bytes_per_s
    # what the router's keep / offload / re-prefill comparison needs (server/sessions.py)
    meta = {"engine": "sim", "profile": profile.name, "h2d_gbps": f"{h2d_bytes_per_s / 1e9:g}",
            "kv_bytes_per_token": str(profile.kv_bytes_per_token)}
    if opts.pool:
        meta["pool"] = opts.pool
    transport: RouterGrpcTransport | None = None
    heartbeat_interval = 1.0
    block_size = opts.block_size
    if opts.redis is None:
        target = opts.router or DEFAULT_ROUTER
        transport = RouterGrpcTransport(target, opts.model, opts.worker_id, role=opts.role,
                                        address=address, block_size=block_size or 0,
                                        metadata=meta)
        try:
            resp = await register_with_retry(transport, deadline_s=30.0)
        except RegistrationRefused as e:
            await transport.close()
            raise SetupError(str(e)) from None
        block_size = block_size or int(resp.block_size)
        transport.block_size = block_size
        # The router's in-process plane forgets a worker after a few silent seconds: beat
        # at least every second whatever the router suggests.
        heartbeat_interval = min(float(resp.heartbeat_interval_s or 1.0), 1.0)
    block_size = block_size or DEFAULT_REDIS_BLOCK_SIZE
    if block_size <= 0:
        raise SetupError("--block-size must be > 0")

    if not opts.link_gbps > 0 or not math.isfinite(opts.link_gbps):
        raise SetupError(f"--link-gbps must be > 0, got {opts.link_gbps}")
    config = EngineConfig(block_size=block_size, kv_capacity_tokens=opts.kv_capacity_tokens,
                          max_num_seqs=opts.max_num_seqs,
                          max_num_batched_tokens=opts.max_num_batched_tokens,
                          link_bytes_per_s=opts.link_gbps * 1e9)
    try:
        engine = SimEngine(profile, config, name=opts.worker_id)
    except ValueError as e:
        raise SetupError(str(e)) from None
    sim = SimWorker(engine, worker=opts.worker_id, model=opts.model, time_scale=opts.time_scale,
                    vocab_size=opts.vocab_size, address=address)
    host_tokens = opts.host_kv_capacity_tokens
    if host_tokens is None:
        host_tokens = 4 * engine.cache.num_blocks * block_size
    if host_tokens:
        sim.kv = SessionKv(engine.cache, host_blocks=host_tokens // block_size,
                           bytes_per_block=profile.kv_bytes_per_token * block_size,
                           h2d_bytes_per_s=h2d_bytes_per_s, ttl_s=opts.session_ttl_s)
    pub_opts: dict[str, Any] = {"block_size": block_size, "role": opts.role, "address": address,
                                "dump": sim.dump, "heartbeat_interval_s": heartbeat_interval,
                                "load_interval_s": 0.02,
                                "extra_meta": meta}
    if transport is not None:
        publisher = EventPublisher(transport, opts.model, opts.worker_id, **pub_opts)
    else:
        assert opts.redis is not None
        publisher = redis_publisher(opts.redis, opts.model, opts.worker_id,
                                    namespace=opts.namespace, **pub_opts)
    sim.publisher = publisher
    service = SimEngineService(sim, opts.role, opts.max_prompt_tokens)
    engine_pb2_grpc.add_EngineServicer_to_server(service, server.server)
    await server.start()
    sim.start()
    await publisher.start()
    publisher.report_load(engine.load_report())
    await server.set_serving()
    log.info("sim engine serving", extra={
        "worker": opts.worker_id, "model": opts.model, "address": address,
        "block_size": block_size, "kv_blocks": engine.cache.num_blocks,
        "time_scale": opts.time_scale,
        "events_to": f"redis {opts.redis}" if opts.redis else f"router {transport and transport.target}"})
    if opts.ready_file:
        Path(opts.ready_file).write_text(f"{address}\n")
    try:
        await stop.wait()
    finally:
        await server.stop(1.0)
        await service.close()
        await sim.stop()
        # Flush what is left, then deregister / mark leaving so routers drop us at once.
        await publisher.stop(leave=True)
        log.info("sim engine stopped", extra={"worker": opts.worker_id})

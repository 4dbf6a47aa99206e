"""Router process: builds the registry from the configuration, serves gRPC (Router, health,
reflection) and /metrics, runs the event plane and periodic maintenance (lease expiry,
metrics snapshot); worker liveness belongs to the event plane."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from kvrouter import mainloop
from kvrouter._proto.v1 import router_pb2, router_pb2_grpc
from kvrouter.config import Config
from kvrouter.events.plane import EventPlane
from kvrouter.events.plane import make_event_plane as make_plane
from kvrouter.events.tasks import cancel_and_wait
from kvrouter.grpc_server import GrpcServer
from kvrouter.registry import Registry
from kvrouter.security.router import RouterSecurity
from kvrouter.server.affinity import make_affinity
from kvrouter.server.memory import HeapTrimmer, tune_allocator
from kvrouter.server.metrics import RouterMetrics, WorkerSample
from kvrouter.server.service import RouterService

log = logging.getLogger("kvrouter.server")

ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


def make_event_plane(config: Config, registry: Registry) -> EventPlane:
    r = config.router
    opts = dict(r.event_plane)
    # One knob for liveness whichever way workers heartbeat (gRPC or Redis).
    opts.setdefault("heartbeat_ttl_s", r.heartbeat_timeout_s or 1e9)
    return make_plane(registry, r.redis_url, **opts)


def build_registry(config: Config) -> Registry:
    registry = Registry()
    r = config.router
    for m in config.models:
        registry.add_model(m.name, m.block_size, m.scheduler_kwargs(r.lease_s, r.report_ttl_s))
    return registry


class RouterApp:
    """One router: `await start()`, then `await stop()` (or `await wait()` until stopped)."""

    def __init__(self, config: Config, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry or build_registry(config)
        self.metrics = RouterMetrics()
        self.event_plane: EventPlane | None = None
        self.service: RouterService | None = None
        self.grpc: GrpcServer | None = None
        self.admin_grpc: GrpcServer | None = None  # router.admin_listen
        self.admin_port = 0
        self.port = 0
        self.ext_proc: Any = None  # server/ext_proc.py ExtProcServer when router.ext_proc is set
        self.ext_proc_port = 0
        self.metrics_port = 0
        self.http: Any = None  # kvrouter.http.server.HttpFront when router.http is set
        self.http_port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    def grpc_options(self) -> list[tuple[str, Any]]:
        size = self.config.router.max_message_bytes
        return [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.http2.max_pings_without_data", 0),
        ]

    async def start(self) -> None:
        r = self.config.router
        tune_allocator()  # before gRPC starts its threads (server/memory.py)
        # TLS files and the auth file are read first: a bad one stops the start at once.
        security = RouterSecurity.from_config(r, metrics_tls=r.metrics_tls)
        try:
            self.event_plane = make_event_plane(self.config, self.registry)
        except ValueError as e:
            raise RuntimeError(f"bad event plane configuration: {e}") from None
        await self.event_plane.start()
        affinity = make_affinity({m.name: m.affinity for m in self.config.models}, self.event_plane)
        self.service = RouterService(self.config, self.registry, self.metrics, self.event_plane,
                                     affinity=affinity)
        server = GrpcServer(r.listen, [ROUTER_SERVICE], options=self.grpc_options(),
                            reflect=r.reflection, tls=security.tls,
                            interceptors=security.interceptors("main"))
        router_pb2_grpc.add_RouterServicer_to_server(self.service, server.server)
        self.port = server.port
        await server.start()
        self.grpc = server
        if r.admin_listen:  # the same servicer; each port serves only its roles' RPCs
            admin = GrpcServer(r.admin_listen, [ROUTER_SERVICE], options=self.grpc_options(),
                               reflect=False, tls=security.tls,
                               interceptors=security.interceptors("admin"))
            router_pb2_grpc.add_RouterServicer_to_server(self.service, admin.server)
            self.admin_port = admin.port
            await admin.start()
            self.admin_grpc = admin
        if r.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(r.metrics_host, r.metrics_port,
                                                       **security.metrics_kwargs())
            except OSError as e:
                await server.stop(None)
                raise RuntimeError(
                    f"cannot serve metrics on {r.metrics_host}:{r.metrics_port}: {e}") from None
        if r.http:
            await self._start_http(r.http, security)
        self._snapshot_metrics()
        self._tasks.append(asyncio.create_task(self._maintenance(), name="kvrouter-maintenance"))
        if r.ext_proc:  # the Gateway API endpoint picker (server/ext_proc.py)
            await self._start_ext_proc(r.ext_proc, security.tls if r.ext_proc_tls else None)
        await server.set_serving()
        if self.admin_grpc is not None:
            await self.admin_grpc.set_serving()
        log.info("router serving", extra={
            "listen": r.listen, "port": self.port, "metrics_port": self.metrics_port,
            "http_port": self.http_port,
            "models": ",".join(m.name for m in self.config.models),
            "event_plane": type(self.event_plane).__name__})

    async def _start_http(self, listen: str, security: RouterSecurity) -> None:
        """The OpenAI-compatible HTTP front (kvrouter.http) on this process's event loop,
        over the service's generate path; TLS and tokens as on the gRPC ports."""
        from kvrouter.http.errors import HttpError
        from kvrouter.http.server import HttpFront, model_ready
        from kvrouter.security.http_auth import bearer_middleware

        assert self.service is not None
        host, _, port = listen.rpartition(":")
        try:
            self.http = HttpFront(self.config, self.service.generate, model_ready(self.service),
                                  metrics=self.metrics)
            if security.authenticator is not None:
                self.http.app.middlewares.append(bearer_middleware(
                    security.authenticator, lambda status, message: HttpError(
                        status, message,
                        "authentication_error" if status == 401 else "permission_error")))
            ssl_context = security.tls.server_ssl_context() if security.tls else None
            self.http_port = await self.http.start(host.strip("[]"), int(port), ssl_context)
        except RuntimeError:
            if self.grpc is not None:
                await self.grpc.stop(None)
            raise

    async def _start_ext_proc(self, listen: str, tls: Any) -> None:
        """The Gateway API Inference Extension endpoint picker (Envoy ext_proc) on its own
        port, over the service's decision path; `tls`: the router's TlsFiles when
        router.ext_proc_tls (served without asking for client certificates)."""
        from kvrouter.server.ext_proc import ExtProcServer, make_picker

        assert self.service is not None
        try:
            if self.config.router.ext_proc_tls and tls is None:
                raise RuntimeError("router.ext_proc_tls needs tls_cert and tls_key")
            self.ext_proc = ExtProcServer(
                listen, make_picker(self.service, self.config), options=self.grpc_options(),
                tls=dataclasses.replace(tls, client_auth=False) if tls is not None else None)
            await self.ext_proc.start()
        except RuntimeError:  # ListenError, a tokenizer that does not load
            await self.stop(None)
            raise
        self.ext_proc_port = self.ext_proc.port

    async def _maintenance(self) -> None:
        interval = self.config.router.expire_interval_s
        assert self.service is not None
        heap = HeapTrimmer()  # returns the memory of oversized messages (server/memory.py)
        while True:
            await asyncio.sleep(interval)
            try:
                self.service.expire_leases()
                self._snapshot_metrics()
                heap.maybe_trim()
            except Exception:  # keep the loop alive; a bug here must not stop lease expiry
                log.exception("maintenance step failed")

    def _snapshot_metrics(self) -> None:
        samples = []
        for name, state in self.registry.models.items():
            loads = {ld.worker: ld for ld in state.scheduler.loads()}
            for info in list(state.workers.values()):
                ld = loads.get(info.wid)
                samples.append(WorkerSample(
                    model=name, worker=info.name, status=info.status.value,
                    reserved_prefill_tokens=ld.reserved_prefill_tokens if ld else 0,
                    reserved_decode_blocks=ld.reserved_decode_blocks if ld else 0,
                    reserved_requests=ld.reserved_requests if ld else 0,
                    cached_blocks=(state.scheduler.approx_blocks(info.wid) if ld and ld.approx
                                   else state.index.worker_blocks(info.wid)),
                    approx=bool(ld and ld.approx),
                    kv_capacity_blocks=ld.kv_capacity_blocks if ld else 0))
        self.metrics.workers.set(
            samples, list(self.registry.models),
            {name: state.scheduler.capacity_reports()
             for name, state in self.registry.models.items()})

    async def stop(self, grace: float | None = 2.0) -> None:
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self.grpc is not None:
            await self.grpc.stop(grace)
            self.grpc = None
        if self.admin_grpc is not None:
            await self.admin_grpc.stop(grace)
            self.admin_grpc = None
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self.ext_proc is not None:
            await self.ext_proc.stop(grace)
            self.ext_proc = None
        if self.event_plane is not None:
            await self.event_plane.stop()
        if self.service is not None:
            await self.service.proxy.close()  # engine channels of Router.Generate
            await self.service.sessions.close()  # engine channels of Offload / Reload
        self.metrics.stop()
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


class Companion(Protocol):
    async def stop(self) -> None: ...


async def serve(config: Config, companions: Sequence[
        Callable[[RouterApp], Awaitable[Companion]]] = ()) -> None:
    """Run a router until SIGINT / SIGTERM. `companions`: started on the running router,
    stopped before it (the entry point passes the embedded autoscaling planner)."""
    app = RouterApp(config)
    await app.start()
    started: list[Companion] = []
    try:
        for start in companions:
            started.append(await start(app))
    except BaseException:
        for c in reversed(started):
            await c.stop()
        await app.stop()
        raise
    stop = asyncio.Event()
    mainloop.stop_on_signals(stop.set)
    await stop.wait()
    t0 = time.monotonic()
    for c in reversed(started):
        await c.stop()
    await app.stop()
    log.info("router stopped", extra={"shutdown_s": round(time.monotonic() - t0, 3)})


def run(config: Config) -> None:
    """Blocking entry point: uvloop when available."""
    mainloop.run(serve(config))

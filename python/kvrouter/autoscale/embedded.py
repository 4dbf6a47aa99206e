"""The planner loop inside `kvrouter serve` (a model's `planner.enabled`; the entry point
passes `start_for` to `server.app.serve` as a companion of the router), and the parts
`kvrouter planner` shares with it: the actuator and the loop are built by the same
functions, and the loop is `PlannerLoop`, so the embedded planner is the standalone one
with the router as its neighbour. It talks to its own router the way the standalone one
does: gRPC (ListWorkers, DrainWorker, DeregisterWorker: the admin port when there is one)
and /metrics, with the client security of this process (KVROUTER_TLS_* / KVROUTER_TOKEN*).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvrouter.autoscale.actuators import Actuator
from kvrouter.autoscale.config import AutoscaleConfig
from kvrouter.autoscale.core import Autoscaler
from kvrouter.autoscale.loop import PlannerLoop, RouterTelemetry
from kvrouter.autoscale.metrics import AutoscaleMetrics
from kvrouter.autoscale.sizing import PerfModel
from kvrouter.client import AsyncRouterClient
from kvrouter.config import Config, ModelConfig
from kvrouter.registry import Role
from kvrouter.security.channels import ClientSecurity

log = logging.getLogger("kvrouter.autoscale")


def make_actuator(kind: str, *, router: str, model: str, pool: str,
                  command: Sequence[str] | None = None, workdir: Path | None = None,
                  namespace: str = "kvrouter", instance: str = "kvrouter") -> Actuator:
    if kind == "kubernetes":
        from kvrouter.autoscale.actuators.kubernetes import KubernetesActuator

        return KubernetesActuator(namespace, instance)
    from kvrouter.autoscale.actuators.local import DEFAULT_TEMPLATE, LocalActuator

    workdir = workdir or Path(tempfile.mkdtemp(prefix="kvrouter-planner-"))
    return LocalActuator(workdir, router=router, model=model, pool=pool,
                         template=list(command) if command else DEFAULT_TEMPLATE)


def make_loop(client: AsyncRouterClient, metrics_url: str, actuator: Actuator,
              cfg: AutoscaleConfig, *, model: str, pool: str, calibration: Path | None = None,
              metrics: AutoscaleMetrics | None = None,
              security: ClientSecurity | None = None) -> PlannerLoop:
    from kvrouter.engines.sim.profile import EngineProfile

    profile = EngineProfile.load(calibration) if calibration else EngineProfile.load()
    scaler = Autoscaler(PerfModel(profile), cfg, model=model, pool=pool, metrics=metrics)
    scaler.keep_decisions = False  # a long-running loop: the log and metrics keep them
    telemetry = RouterTelemetry(client, metrics_url, model, pool, security=security)
    return PlannerLoop(scaler, telemetry, actuator, client)


async def start_minimum(actuator: Actuator, cfg: AutoscaleConfig) -> None:
    """A local actuator with nothing running starts the minimum fleet (the embedded
    default brings the whole stack up)."""
    if not await actuator.workers():
        for role, n in ((Role.PREFILL, cfg.min_prefill), (Role.DECODE, cfg.min_decode)):
            for _ in range(n):
                await actuator.start(role)


def _local(address: str) -> str:
    """A listen address as a client reaches it on this machine."""
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("", "0.0.0.0", "[::]", "::") else address


@dataclass
class EmbeddedPlanners:
    """The planner loops of a router's models; `stop()` ends them and their engines."""

    tasks: list[asyncio.Task[None]]
    actuators: list[Actuator]
    clients: list[AsyncRouterClient]
    stop_event: asyncio.Event
    metrics: AutoscaleMetrics | None = None

    async def stop(self) -> None:
        self.stop_event.set()
        for t in self.tasks:
            try:
                await asyncio.wait_for(t, 30.0)
            except (TimeoutError, asyncio.CancelledError):
                t.cancel()
        for a in self.actuators:
            close = getattr(a, "close", None)
            if close is not None:
                await close()  # the engines a local actuator started go with the router
        for c in self.clients:
            await c.close()


def settings(config: Config) -> dict[str, AutoscaleConfig]:
    """The planner settings of the models that enable it (pydantic.ValidationError when a
    model's `planner.settings` are not AutoscaleConfig fields)."""
    return {m.name: AutoscaleConfig.model_validate(m.planner.settings)
            for m in config.models if m.planner.enabled}


async def start_for(app: Any) -> EmbeddedPlanners:
    """`start_embedded` on a started `server.app.RouterApp` (its bound ports, its /metrics)."""
    return await start_embedded(app.config, port=app.port, admin_port=app.admin_port,
                                metrics_port=app.metrics_port, registry=app.metrics.registry)


def _bound(address: str, port: int) -> str:
    """`address` with the port actually bound (a configured port 0 is a free one)."""
    return f"{address.rpartition(':')[0]}:{port}"


async def start_embedded(config: Config, *, port: int, admin_port: int = 0,
                         metrics_port: int = 0, registry: Any = None) -> EmbeddedPlanners:
    """Start a planner loop for every model whose `planner.enabled` is set, against the
    router serving `config` on the bound ports; its metrics join `registry` (the router's
    /metrics)."""
    r = config.router
    models = [m for m in config.models if m.planner.enabled]
    out = EmbeddedPlanners([], [], [], asyncio.Event())
    if not models:
        return out
    if not metrics_port:
        raise RuntimeError("planner.enabled needs the router's /metrics (metrics_port > 0)")
    security = ClientSecurity.from_env()
    scheme = "https" if r.tls_cert is not None and r.metrics_tls else "http"
    metrics_url = f"{scheme}://{_local(_bound(f'{r.metrics_host}:0', metrics_port))}/metrics"
    listen = _local(_bound(r.listen, port))
    target = _local(_bound(r.admin_listen, admin_port)) if r.admin_listen else listen
    out.metrics = AutoscaleMetrics(registry)
    for m in models:
        out.tasks.append(asyncio.create_task(
            _run(m, target, listen, metrics_url, security, out),
            name=f"planner-{m.name}"))
    return out


async def _run(m: ModelConfig, target: str, router: str, metrics_url: str,
               security: ClientSecurity, out: EmbeddedPlanners) -> None:
    pc = m.planner
    cfg = AutoscaleConfig.model_validate(pc.settings)
    actuator = make_actuator(pc.actuator, router=router, model=m.name, pool=pc.pool,
                             command=pc.command, workdir=pc.workdir, namespace=pc.namespace,
                             instance=pc.instance)
    out.actuators.append(actuator)
    client = AsyncRouterClient(target, security=security)
    out.clients.append(client)
    loop = make_loop(client, metrics_url, actuator, cfg, model=m.name, pool=pc.pool,
                     calibration=pc.calibration, metrics=out.metrics, security=security)
    log.info("planner started in the router", extra={"model": m.name, "pool": pc.pool,
                                                     "actuator": pc.actuator})
    try:
        if pc.actuator == "local":
            await start_minimum(actuator, cfg)
        await loop.run(out.stop_event)
    except Exception:  # the router keeps serving; the planner's failure is logged
        log.exception("planner stopped", extra={"model": m.name})

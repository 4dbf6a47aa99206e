"""`kvrouter planner`: the autoscaling planner as a process.

Without --router it brings up the whole local stack: a router (`kvrouter serve` on a
free port, with /metrics), the planner, and simulated engines started by the local
actuator (min prefill + min decode to begin with). With --router it plans the pool of a
running router; --actuator kubernetes scales the Deployments of deploy/k8s/ instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import tempfile
from pathlib import Path
from typing import Any

from kvrouter.autoscale.config import SLO, AutoscaleConfig
from kvrouter.security.channels import ClientSecurity

log = logging.getLogger("kvrouter.autoscale")


def register(sub: Any) -> None:
    d = AutoscaleConfig()
    p = sub.add_parser("planner", help="autoscale prefill/decode/aggregated workers from router "
                                       "telemetry",
                       description=__doc__)
    p.add_argument("--router", metavar="HOST:PORT", default=None,
                   help="plan a running router (default: start one here)")
    p.add_argument("--metrics-url", default=None,
                   help="the router's /metrics (default http://127.0.0.1:9400/metrics with "
                        "--router; https when KVROUTER_TLS_* is set)")
    p.add_argument("--model", default="default")
    p.add_argument("--pool", default="disaggregated")
    p.add_argument("--calibration", type=Path, default=None,
                   help="the engines' calibration file (default: the sim engine's)")
    p.add_argument("--ttft", type=float, default=d.slo.ttft_s, help="TTFT SLO, seconds")
    p.add_argument("--itl", type=float, default=d.slo.itl_s, help="ITL SLO, seconds")
    p.add_argument("--interval", type=float, default=d.interval_s, help="seconds per tick")
    p.add_argument("--max-workers", type=int, default=d.max_workers)
    p.add_argument("--min-prefill", type=int, default=d.min_prefill)
    p.add_argument("--min-decode", type=int, default=d.min_decode)
    p.add_argument("--no-aggregated", action="store_true",
                   help="never size an aggregated pool (prefill and decode workers only)")
    p.add_argument("--start-s", type=float, default=None,
                   help="expected cold start (default: 5 s locally, else "
                        f"{d.start_s:g})")
    p.add_argument("--actuator", choices=("local", "kubernetes"), default="local")
    p.add_argument("--command", default=None,
                   help="local: engine command template with {name} {role} {pool} {model} "
                        "{router} (default: a simulated engine)")
    p.add_argument("--workdir", type=Path, default=None, help="local: logs of the engines")
    p.add_argument("--namespace", default="kvrouter", help="kubernetes: namespace")
    p.add_argument("--instance", default="kvrouter",
                   help="kubernetes: Deployments <instance>-prefill, -decode and -aggregated")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve the planner's own /metrics here (0: off)")
    p.add_argument("--ticks", type=int, default=0, help="stop after this many ticks (0: run)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_cmd)


def default_metrics_url(security: ClientSecurity, port: int = 9400) -> str:
    """The router's /metrics on this machine: https when the process has TLS settings (the
    router serves /metrics over TLS with its certificate, `router.metrics_tls`)."""
    scheme = "https" if security.tls is not None else "http"
    return f"{scheme}://127.0.0.1:{port}/metrics"


def _config(args: argparse.Namespace) -> AutoscaleConfig:
    local = args.actuator == "local" and args.router is None
    start_s = args.start_s if args.start_s is not None else (5.0 if local else
                                                             AutoscaleConfig().start_s)
    return AutoscaleConfig(slo=SLO(ttft_s=args.ttft, itl_s=args.itl), interval_s=args.interval,
                           max_workers=args.max_workers, min_prefill=args.min_prefill,
                           min_decode=args.min_decode, start_s=start_s,
                           aggregated=not args.no_aggregated)


async def _main(args: argparse.Namespace, cfg: AutoscaleConfig) -> None:
    from prometheus_client import start_http_server

    from kvrouter.autoscale.embedded import make_actuator, make_loop, start_minimum
    from kvrouter.autoscale.metrics import AutoscaleMetrics
    from kvrouter.client import AsyncRouterClient
    from kvrouter.engines.sim.profile import EngineProfile
    from kvrouter.mainloop import stop_on_signals

    if args.calibration:
        EngineProfile.load(args.calibration)  # a bad file fails before anything starts
    metrics = AutoscaleMetrics()
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=metrics.registry)
    router_proc = None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kvrouter-planner-"))
    # One set of client credentials (KVROUTER_TLS_* / KVROUTER_TOKEN*, as every kvrouter
    # client) for the router's gRPC and its /metrics; the token needs the admin role
    # (DrainWorker, DeregisterWorker).
    security = ClientSecurity.from_env()
    target, metrics_url = args.router, args.metrics_url
    if target is None:
        from kvrouter.testing.processes import start_router

        router_proc = start_router(workdir, metrics=True, security=security)
        target = router_proc.target
        metrics_url = default_metrics_url(security, router_proc.metrics_port)
        print(f"router {target} (metrics {metrics_url}); engine logs in {workdir}", flush=True)
    metrics_url = metrics_url or default_metrics_url(security)
    actuator = make_actuator(args.actuator, router=target, model=args.model, pool=args.pool,
                             command=shlex.split(args.command) if args.command else None,
                             workdir=workdir, namespace=args.namespace, instance=args.instance)
    stop = asyncio.Event()
    stop_on_signals(stop.set)
    try:
        async with AsyncRouterClient(target, security=security) as client:
            loop = make_loop(client, metrics_url, actuator, cfg, model=args.model,
                             pool=args.pool, calibration=args.calibration, metrics=metrics,
                             security=security)
            if args.actuator == "local":
                await start_minimum(actuator, cfg)
            ticks = 0
            while not stop.is_set():
                await loop.tick()  # each decision is logged (INFO when it acts)
                ticks += 1
                if args.ticks and ticks >= args.ticks:
                    break
                try:
                    await asyncio.wait_for(stop.wait(), cfg.interval_s)
                except TimeoutError:
                    pass
    finally:
        close = getattr(actuator, "close", None)
        if close is not None and args.router is None:
            await close()  # the engines this command started go with it
        if router_proc is not None:
            router_proc.stop(5.0)


def _cmd(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from kvrouter.autoscale.actuators import ActuatorError
    from kvrouter.engines.sim.profile import ProfileError
    from kvrouter.logs import setup_logging
    from kvrouter.mainloop import run_command

    try:
        cfg = _config(args)
    except ValidationError as e:
        print(f"kvrouter planner: {e}", flush=True)
        return 2
    setup_logging(args.log_level)
    return run_command("kvrouter planner", _main(args, cfg),
                       failures=(ProfileError, ActuatorError, OSError, ValueError))

"""The planner against real processes after a restart: a router, simulated engines started
by the local actuator. The decode workers' KV usage comes from their load reports, and a
fresh planner finishes (stops) a drain its predecessor started."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvrouter.autoscale import ActionKind, AutoscaleConfig, Autoscaler, PerfModel
from kvrouter.autoscale.actuators.local import LocalActuator
from kvrouter.autoscale.loop import PlannerLoop, RouterTelemetry
from kvrouter.client import AsyncRouterClient
from kvrouter.engines.sim import EngineProfile
from kvrouter.engines.sim.profile import PROFILES_DIR
from kvrouter.registry import Role
from kvrouter.testing.wait import async_wait_until
from tests.generate_helpers import router_config

PROFILE = PROFILES_DIR / "h200-llama-49b-shape.json"


def _planner(client: AsyncRouterClient, metrics_url: str, actuator: LocalActuator,
             ) -> tuple[Autoscaler, RouterTelemetry, PlannerLoop]:
    scaler = Autoscaler(PerfModel(EngineProfile.load(PROFILE)),
                        AutoscaleConfig(interval_s=1.0, action_timeout_s=20.0))
    tel = RouterTelemetry(client, metrics_url, "default", "disaggregated")
    return scaler, tel, PlannerLoop(scaler, tel, actuator, client)


async def _scenario(router: Any, workdir: Path) -> dict[str, Any]:
    actuator = LocalActuator(workdir, router=router.target, grace_s=5.0,
                             extra_args=["--time-scale", "0.2", "--profile", str(PROFILE)])
    url = f"http://127.0.0.1:{router.metrics_port}/metrics"
    try:
        async with AsyncRouterClient(router.target) as client:
            names = [await actuator.start(r) for r in (Role.PREFILL, Role.DECODE, Role.DECODE)]

            async def all_up() -> bool:
                ws = await client.list_workers("default")
                return sorted(w.name for w in ws if w.status == "up") == sorted(names)
            await async_wait_until(all_up, 60, interval=0.2, what="engines up")
            # the first planner: reads telemetry, then drains a decode worker and goes away
            _, tel, _ = _planner(client, url, actuator)
            await tel.read(1.0)
            sample = await tel.read(2.0)
            victim = names[2]
            await client.drain_worker("default", victim)
            # the restarted planner: same engines, no memory of the drain
            _, _, loop = _planner(client, url, actuator)
            decision = await loop.tick()
            launched = [w.name for w in await actuator.workers()]
            workers = {w.name: w.status for w in await client.list_workers("default")}
    finally:
        await actuator.close()
    return {"sample": sample, "decision": decision, "victim": victim, "launched": launched,
            "workers": workers, "names": names}


def test_restarted_planner_stops_the_drained_worker_and_reads_kv_usage(
        router_server: Callable[..., Any], tmp_path: Path) -> None:
    router = router_server(router_config(), metrics=True)
    r = asyncio.run(_scenario(router, tmp_path / "engines"))
    sample = r["sample"]
    # both decode engines report their cache; idle, they hold (almost) nothing
    assert sample is not None and sample.kv_workers == 2
    assert sample.kv_usage is not None and 0.0 <= sample.kv_usage < 0.5
    victim = r["victim"]
    assert [(a.kind, a.worker, a.reason) for a in r["decision"].actions] == [
        (ActionKind.STOP, victim, "drained")]
    assert victim not in r["launched"] and victim not in r["workers"]  # stopped, deregistered
    assert r["workers"] == {n: "up" for n in r["names"] if n != victim}

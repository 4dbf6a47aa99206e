"""The autoscaling planner with real processes: a router, simulated engines started and
stopped by the local actuator, a load step through Router.Generate."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from kvrouter._proto.v1 import common_pb2, router_pb2, router_pb2_grpc
from kvrouter.autoscale import SLO, ActionKind, AutoscaleConfig, Autoscaler, PerfModel
from kvrouter.autoscale.actuators.local import LocalActuator
from kvrouter.autoscale.loop import PlannerLoop, RouterTelemetry
from kvrouter.client import AsyncRouterClient
from kvrouter.engines.sim import EngineProfile
from kvrouter.engines.sim.profile import PROFILES_DIR
from kvrouter.registry import Role
from tests.generate_helpers import router_config

PROFILE = PROFILES_DIR / "h200-llama-49b-shape.json"


async def _generate(stub: Any, seed: int, out: list[tuple[grpc.StatusCode, int]]) -> None:
    rng = random.Random(seed)
    req = router_pb2.RouterGenerateRequest(
        token_ids=[rng.randrange(32000) for _ in range(2000)], request_id=uuid.uuid4().hex,
        sampling=common_pb2.SamplingParams(max_tokens=4))
    n = 0
    try:
        async for resp in stub.Generate(req, timeout=60):
            n += len(resp.token_ids)
        out.append((grpc.StatusCode.OK, n))
    except grpc.RpcError as e:
        out.append((e.code(), n))


async def _scenario(router: Any, workdir: Path) -> dict[str, Any]:
    # The engines run 5x faster than the profile (--time-scale 0.2) while the planner sizes
    # with the profile itself: it over-provisions, which is what a load step needs to show.
    actuator = LocalActuator(workdir, router=router.target, grace_s=5.0,
                             extra_args=["--time-scale", "0.2", "--profile", str(PROFILE)])
    cfg = AutoscaleConfig(slo=SLO(ttft_s=2.0, itl_s=0.05), interval_s=1.0, start_s=1.0,
                          max_workers=5, recent_ticks=2, down_stable_ticks=1, down_band=0,
                          down_cooldown_s=0.0, up_cooldown_s=0.0, headroom=0.0,
                          ready_timeout_s=60.0, telemetry_max_age_s=30.0,
                          action_timeout_s=20.0)
    scaler = Autoscaler(PerfModel(EngineProfile.load(PROFILE)), cfg)
    replies: list[tuple[grpc.StatusCode, int]] = []
    started: set[str] = set()
    try:
        async with AsyncRouterClient(router.target) as client, \
                grpc.aio.insecure_channel(router.target) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            tel = RouterTelemetry(client, f"http://127.0.0.1:{router.metrics_port}/metrics",
                                  "default", "disaggregated")
            loop = PlannerLoop(scaler, tel, actuator, client)

            async def tick_until(cond: Callable[[], bool], limit: int) -> None:
                for _ in range(limit):
                    await loop.tick()
                    started.update(w.name for w in await actuator.workers())
                    if cond():
                        return
                    await asyncio.sleep(cfg.interval_s)
                raise AssertionError(f"not reached in {limit} ticks: "
                                     f"{[d.as_log() for d in scaler.decisions[-3:]]}")

            def ready() -> int:
                return sum(1 for w in tel.workers.values() if w.status == "up")

            await actuator.start(Role.PREFILL)
            await actuator.start(Role.DECODE)
            await tick_until(lambda: ready() == 2, 60)
            # the step: ~8 requests/s of 2000-token prompts for 6 s
            load: list[asyncio.Task[None]] = []
            for i in range(48):
                load.append(asyncio.create_task(_generate(stub, i, replies)))
                if i % 8 == 7:
                    await loop.tick()
                    await asyncio.sleep(1.0)
            await tick_until(lambda: len(tel.workers) > 2 and ready() == len(tel.workers), 60)
            await asyncio.gather(*load)
            # quiet again: back to the minimum, drained first
            await tick_until(lambda: len(tel.workers) == 2 and ready() == 2, 90)
            workers = await client.list_workers("default")
            models = await client.list_models()
            launched = [w.name for w in await actuator.workers()]
    finally:
        await actuator.close()
    return {"replies": replies, "decisions": scaler.decisions, "workers": workers,
            "models": models, "launched": launched, "started": started}


def test_local_actuator_follows_a_load_step(router_server: Callable[..., Any],
                                            tmp_path: Path) -> None:
    router = router_server(router_config(), metrics=True)
    r = asyncio.run(_scenario(router, tmp_path / "engines"))
    replies = r["replies"]
    assert len(replies) == 48
    assert all(code == grpc.StatusCode.OK and n == 4 for code, n in replies), replies
    acts = [a for d in r["decisions"] for a in d.actions]
    assert any(a.kind is ActionKind.START for a in acts)
    drained = [a for a in acts if a.kind is ActionKind.DRAIN and a.to_role is None]
    stopped = {a.worker for a in acts if a.kind is ActionKind.STOP and a.reason == "drained"}
    assert drained and stopped == {a.worker for a in drained}
    # the router knows exactly the workers that run; the stopped ones left routing
    names = {w.name for w in r["workers"]}
    assert names == set(r["launched"]) and not names & stopped
    assert len(r["started"]) > 2
    assert all(w.reserved_requests == 0 for w in r["workers"])  # no reservation leaked
    (model,) = [m for m in r["models"] if m.name == "default"]
    assert model.workers == 2
    # the index holds no block of a removed worker: what is left is held by the live ones
    assert model.indexed_blocks <= sum(w.cached_blocks for w in r["workers"])

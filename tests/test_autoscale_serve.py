"""The planner inside `kvrouter serve` (a model's `planner.enabled`): the router process
starts the minimum fleet of simulated engines through the local actuator, plans it every
tick (its decisions on the router's own /metrics), and takes the engines down with it."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import ValidationError

from kvrouter.client import AsyncRouterClient
from kvrouter.config import ModelConfig
from kvrouter.engines.sim.profile import PROFILES_DIR
from kvrouter.testing.processes import child_env, kvrouter_cmd, start_router
from kvrouter.testing.wait import wait_until
from tests.generate_helpers import router_config


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_router_runs_the_planner_when_configured(tmp_path: Path) -> None:
    cfg = router_config()
    cfg["router"]["log_level"] = "INFO"
    cfg["models"][0]["planner"] = {
        "enabled": True, "workdir": str(tmp_path / "engines"),
        "calibration": str(PROFILES_DIR / "h200-llama-49b-shape.json"),
        "settings": {"interval_s": 0.5, "start_s": 1.0, "max_workers": 4,
                     "min_prefill": 1, "min_decode": 1}}
    router = start_router(tmp_path, cfg, metrics=True)
    try:
        async def roles() -> list[tuple[str, str]]:
            async with AsyncRouterClient(router.target) as c:
                return sorted((w.role, w.status) for w in await c.list_workers("default"))

        wait_until(lambda: asyncio.run(roles()) == [("decode", "up"), ("prefill", "up")], 60,
                   what="the embedded planner's minimum fleet registered")
        metrics_url = f"http://127.0.0.1:{router.metrics_port}/metrics"
        wait_until(lambda: 'outcome="steady"' in httpx.get(metrics_url).text, 30,
                   what="planner decisions on the router's /metrics")
        text = httpx.get(metrics_url).text
        assert 'kvrouter_autoscale_target_workers{model="default",pool="disaggregated",' \
               'role="aggregated"} 0.0' in text
    finally:
        router.stop(20.0)
    log = router.log_path.read_text()
    pids = [int(p) for p in re.findall(r"worker started.*?pid=(\d+)", log)]
    assert len(pids) == 2, log[-2000:]
    wait_until(lambda: not any(_alive(p) for p in pids), 20,
               what="the engines stopped with the router")


def test_bad_planner_settings_stop_serve_before_it_starts(tmp_path: Path) -> None:
    cfg = router_config()
    cfg["models"][0]["planner"] = {"enabled": True, "settings": {"max_workers": 0}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([*kvrouter_cmd("serve", "--config", str(path), "--listen",
                                        "127.0.0.1:0")],
                         capture_output=True, text=True, timeout=60, env=child_env(None))
    assert out.returncode == 2 and "planner.settings" in out.stderr, out.stderr
    with pytest.raises(ValidationError):
        ModelConfig(name="m", planner={"enabled": True, "actuator": "docker"})
    assert not ModelConfig(name="m").planner.enabled

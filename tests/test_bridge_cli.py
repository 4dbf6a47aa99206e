"""`kvrouter bridge` as real processes: a fake SGLang engine (real ZMQ, SGLang's array
layout) -> `kvrouter bridge sglang` subprocess -> real Redis -> `kvrouter serve
--redis-url` subprocess, checked through the router's own gRPC (Route, ListWorkers)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from kvrouter.client import RouterClient
from kvrouter.testing.processes import child_env, kvrouter_cmd, stop_process
from tests.conftest import RouterProcess, run_cli
from tests.test_bridge_vllm import FakeZmqEngine, eventually

REDIS_URL = "redis://127.0.0.1:6379/0"
BLOCK = 32
pytestmark = pytest.mark.timeout(90)


def sglang_stored(tokens: list[int], hashes: list[int], parent: int | None,
                  page: int) -> list[Any]:
    # SGLang: tagged arrays [tag, block_hashes, parent_block_hash, token_ids, block_size, lora_id]
    return ["BlockStored", hashes, parent, tokens, page, None]


@pytest.fixture
def model() -> Iterator[str]:
    name = f"bm{uuid.uuid4().hex[:10]}"
    yield name
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(f"kvrouter:*{name}*"))
    if keys:
        r.delete(*keys)
    r.close()


class Bridges:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[subprocess.Popen[str], Path]] = []

    def start(self, *args: str) -> subprocess.Popen[str]:
        log = self.tmp / f"bridge{len(self.procs)}.log"
        with log.open("w") as f:
            proc = subprocess.Popen(kvrouter_cmd("bridge", *args), stdout=f,
                                    stderr=subprocess.STDOUT, text=True, env=child_env())
        self.procs.append((proc, log))
        return proc

    def logs(self) -> str:
        return "\n".join(p.read_text() for _, p in self.procs if p.exists())

    def stop_all(self) -> list[int]:
        return [stop_process(proc) for proc, _ in self.procs]


@pytest.fixture
def bridges(tmp_path: Path) -> Iterator[Bridges]:
    b = Bridges(tmp_path)
    yield b
    b.stop_all()


def test_sglang_bridge_feeds_router_and_mismatch_shows_in_list_workers(
        router_server: Callable[..., RouterProcess], bridges: Bridges, model: str) -> None:
    router = router_server({"router": {"redis_url": REDIS_URL},
                            "models": [{"name": model, "block_size": BLOCK}]}, metrics=True)
    rng = random.Random(11)
    tokens = [rng.randrange(1, 30000) for _ in range(3 * BLOCK + 7)]
    hashes = [rng.getrandbits(63) - (1 << 62) for _ in range(3)]  # signed, like Python hash()
    small = [rng.randrange(1, 30000) for _ in range(2 * 16)]

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        ok = FakeZmqEngine(ctx, topic=b"", with_dp_rank=False)
        bad = FakeZmqEngine(ctx, topic=b"", with_dp_rank=False)
        common = ["--model", model, "--redis", REDIS_URL, "--heartbeat-ttl", "2"]
        bridges.start("sglang", "--zmq", ok.endpoint, "--replay", ok.replay_endpoint,
                      "--worker-id", "sg-0", "--block-size", "32", "--router-block-size", "32",
                      "--http-url", "http://127.0.0.1:9", "--no-health-check",
                      "--served-model", "qwen", "--meta", "pool=p1", *common)
        bridges.start("sglang", "--zmq", bad.endpoint, "--worker-id", "sg-16", *common)
        await ok.wait_subscriber()
        await bad.wait_subscriber()
        full = 3 * BLOCK
        await ok.send([sglang_stored(tokens[:BLOCK], hashes[:1], None, BLOCK)])
        await ok.send([sglang_stored(tokens[BLOCK:full], hashes[1:], hashes[0], BLOCK)])
        await bad.send([sglang_stored(small, [1, 2], None, 16)])

        with RouterClient(router.target, timeout=5) as client:
            def routed() -> bool:
                try:
                    d = client.route(tokens, model, dry_run=True, candidates=["sg-0"])
                except Exception:
                    return False
                return d.worker == "sg-0" and d.overlap_blocks == 3

            def listed() -> bool:
                ws = {w.name: w for w in client.list_workers(model)}
                return "sg-0" in ws and "sg-16" in ws and ws["sg-16"].status == "mismatch"

            try:
                await eventually(lambda: asyncio.to_thread(routed), timeout=20,
                                 what="route overlap via the router")
                await eventually(lambda: asyncio.to_thread(listed), timeout=20,
                                 what="ListWorkers with the mismatched worker")
            except AssertionError:
                raise AssertionError(f"bridge logs:\n{bridges.logs()}\nrouter log:\n"
                                     f"{router.logs()}") from None
            ws = {w.name: w for w in client.list_workers(model)}
            assert ws["sg-0"].status == "up" and ws["sg-0"].cached_blocks == 3
            assert ws["sg-0"].metadata.get("engine") == "sglang"
            assert "16" in ws["sg-16"].status_reason
            assert not ws["sg-16"].routable
            # Proxy mode: how Router.Generate reaches the engine.
            md = ws["sg-0"].metadata
            assert (md["backend"], md["served_model"], md["pool"]) == ("openai", "qwen", "p1")
            assert ws["sg-0"].address == "http://127.0.0.1:9"
            assert ws["sg-16"].metadata["served_model"] == model  # default: --model
            assert ws["sg-0"].status_reason == ""

            # The router's /metrics: workers by status (mismatch too) and the event plane's.
            def metric(name: str, **labels: str) -> float | None:
                url = f"http://127.0.0.1:{router.metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as resp:
                    text = resp.read().decode()
                for fam in text_string_to_metric_families(text):
                    for smp in fam.samples:
                        if smp.name == name and all(smp.labels.get(k) == v
                                                    for k, v in labels.items()):
                            return float(smp.value)
                return None

            await eventually(lambda: metric("kvrouter_workers", model=model,
                                            status="mismatch") == 1, timeout=20,
                             what="kvrouter_workers{status=mismatch} on the router's /metrics")
            assert metric("kvrouter_workers", model=model, status="up") == 1
            applied = metric("kvrouter_events_applied_total", model=model)
            assert applied is not None and applied >= 3
            assert metric("kvrouter_events_malformed_total") is not None

            # A graceful stop tells routers at once: the workers leave.
            assert bridges.stop_all() == [0, 0]
            await eventually(lambda: not client.list_workers(model), 10,
                             what="the workers leave after a graceful stop")
        await ok.close()
        await bad.close()
        ctx.destroy(0)

    asyncio.run(main())


def test_incompatible_block_sizes_are_refused_at_startup() -> None:
    r = run_cli("bridge", "vllm", "--zmq", "tcp://127.0.0.1:1", "--worker-id", "w",
                "--model", "m", "--redis", REDIS_URL, "--block-size", "16",
                "--router-block-size", "32", timeout=30)
    assert r.returncode == 2
    assert "block size" in r.stderr and "16" in r.stderr and "32" in r.stderr
    r = run_cli("bridge", "sglang", "--zmq", "http://x", "--worker-id", "w", "--model", "m",
                "--redis", REDIS_URL, timeout=30)
    assert r.returncode == 2 and "tcp://" in r.stderr


def test_engine_command_without_tensorrt_llm_says_how_to_install() -> None:
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt_llm is installed here")
    r = run_cli("engine", "trtllm", "--model", "/nonexistent", "--worker-id", "w",
                "--redis", REDIS_URL, timeout=30)
    assert r.returncode == 3
    assert "pip install 'kvrouter[trtllm]'" in r.stderr
